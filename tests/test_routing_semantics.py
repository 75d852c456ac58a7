"""keep_mask and slot_of behave as DESIGN.md says: pruned experts are never chosen, merged choices add."""

from __future__ import annotations

import torch

import moeopt
from moeopt.ir.routing import route
from moeopt.ir.spec import RouterSpec
from moeopt.ir.table import SlotInfo
from moeopt.testing import tiny_model
from tests.conftest import model_inputs


def test_pruned_experts_are_never_chosen_and_kept_weights_unchanged() -> None:
    spec = RouterSpec(num_experts=6, top_k=2, score_fn="softmax", norm="none")
    logits = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    keep = torch.tensor([True, False, True, True, False, True])
    w, idx = route(logits, spec, keep)
    assert not torch.isin(idx, torch.tensor([1, 4])).any()
    probs = torch.softmax(logits, -1)
    assert torch.equal(w, probs.gather(1, idx))  # weights are the ORIGINAL router's probabilities


def _hf_route(fn: str, logits: torch.Tensor, jitter_eps: float,
              bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' own router of each score function, with the identity as router weight (so its
    router logits are `logits`): routing with no keep_mask at all."""
    from transformers import DeepseekV3Config, GraniteMoeConfig, MixtralConfig
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    from transformers.models.granitemoe.modeling_granitemoe import GraniteMoeTopKRouter
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    e = logits.shape[1]
    if fn == "sparsemixer":
        w, i = sparsemixer(logits, jitter_eps, training=False)
        return w, i
    router: torch.nn.Module
    if fn == "softmax":
        router = MixtralTopKRouter(MixtralConfig(hidden_size=e, num_local_experts=e, num_experts_per_tok=2))
    elif fn == "topk_softmax":
        router = GraniteMoeTopKRouter(GraniteMoeConfig(hidden_size=e, num_local_experts=e, num_experts_per_tok=2))
    else:
        router = DeepseekV3TopkRouter(DeepseekV3Config(hidden_size=e, n_routed_experts=e, num_experts_per_tok=2,
                                                       n_group=4, topk_group=2, norm_topk_prob=True,
                                                       routed_scaling_factor=2.5))
        router.e_score_correction_bias.copy_(bias)
    with torch.no_grad():
        router.weight.copy_(torch.eye(e))
        out, w, i = router(logits)
    assert torch.equal(out, logits)  # the identity router really passes the logits through
    return w, i


def test_all_kept_mask_is_a_no_op() -> None:
    """An all-True keep_mask routes exactly as the source router does without any mask: same experts in
    the same order, bit-identical weights, for every score function (sparsemixer with a jitter
    threshold that masks some experts itself)."""
    bias = torch.randn(8, generator=torch.Generator().manual_seed(2)) * 0.1
    for fn, norm in [("softmax", "sum"), ("sigmoid", "sum_eps"), ("topk_softmax", "none"), ("sparsemixer", "none")]:
        sigmoid = fn == "sigmoid"
        spec = RouterSpec(num_experts=8, top_k=2, score_fn=fn, norm=norm, norm_eps=1e-20,  # type: ignore[arg-type]
                          n_group=4 if sigmoid else 1, topk_group=2 if sigmoid else 1, has_score_bias=sigmoid,
                          sorted_topk=not sigmoid, jitter_eps=0.5 if fn == "sparsemixer" else 0.0,
                          scale=2.5 if sigmoid else 1.0)  # DeepSeek-V3's routed_scaling_factor
        logits = torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
        w1, i1 = route(logits, spec, torch.ones(8, dtype=torch.bool), bias if sigmoid else None)
        w0, i0 = _hf_route(fn, logits, spec.jitter_eps, bias)
        assert torch.equal(i1, i0), fn
        assert torch.equal(w1, w0.float()), fn


def test_slot_of_merges_add_weights() -> None:
    """Two experts sharing a slot with identical weights == that slot applied with the summed weight."""
    model = moeopt.load(tiny_model("mixtral"))
    layer = model.layers[0]
    t = layer.table
    # Make expert 1 a copy of expert 0, then route both to slot 0: the output must not change.
    with torch.no_grad():
        t.w_in[1].copy_(t.w_in[0])
        t.w_out[1].copy_(t.w_out[0])
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = layer(x)
        t.set_slots(t.w_in[[0, 2, 3]], t.w_out[[0, 2, 3]], [SlotInfo((0, 1)), SlotInfo((2,)), SlotInfo((3,))])
        moeopt.verify(model)
        after = layer(x)
    assert t.state(1) == "merged" and t.state(0) == "kept"
    assert (after - before).abs().max().item() <= 1e-6


def test_pruning_a_never_routed_expert_is_exact() -> None:
    model = moeopt.load(tiny_model("qwen3_moe"))
    kw = model_inputs("qwen3_moe", batch=1, seq=2)  # 2 tokens x top-2 < 6 experts: some never routed
    seen: list[set[int]] = [set() for _ in model.layers]

    def obs(layer: moeopt.MoELayer, trace: object) -> None:
        seen[layer.index].update(trace.index.unique().tolist())  # type: ignore[attr-defined]

    for layer in model.layers:
        layer.observers.append(obs)
    ref = model.logits(kw["input_ids"])
    for layer in model.layers:
        layer.observers.clear()
        t = layer.table
        unused = [e for e in range(t.num_experts) if e not in seen[layer.index]]
        keep = [s for s in range(t.num_slots) if s not in unused]
        if not unused:
            continue
        t.set_slots(t.w_in[keep], t.w_out[keep], [t.slots[s] for s in keep])
    moeopt.verify(model)
    assert any(layer.table.num_slots < layer.table.num_experts for layer in model.layers)
    assert torch.equal(model.logits(kw["input_ids"]), ref)
