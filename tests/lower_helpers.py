"""Shared by test_lower.py and test_runtime.py: artifacts built once per test session, and references.

Export takes tens of seconds, so each artifact is built once and shared by every xdist worker through
a folder under the session's common temp root, guarded by a file lock (pytest-xdist's recipe).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from filelock import FileLock

import moeopt
from moeopt.ir.layer import DenseExpert, MoELayer
from moeopt.ir.model import MoEModel
from moeopt.ir.spec import ExpertSpec, RouterSpec, SharedSpec
from moeopt.ir.table import ExpertTable, SlotInfo
from moeopt.lower import lower
from moeopt.lower.decoder import no_router_outputs
from moeopt.testing import tiny_model

VOCAB = 97


def tiny(arch: str) -> MoEModel:
    return moeopt.load(tiny_model(arch))


def compressed_qwen3() -> MoEModel:
    """qwen3_moe with experts pruned and merged in both layers (edits as test_routing_semantics does)."""
    model = tiny("qwen3_moe")
    t0, t1 = model.layers[0].table, model.layers[1].table
    # layer 0: expert 5 pruned, 1 merged into 0 (slot = mean of the two), others kept
    w_in0 = torch.stack([(t0.w_in[0] + t0.w_in[1]) / 2, t0.w_in[2], t0.w_in[3], t0.w_in[4]])
    w_out0 = torch.stack([(t0.w_out[0] + t0.w_out[1]) / 2, t0.w_out[2], t0.w_out[3], t0.w_out[4]])
    t0.set_slots(w_in0, w_out0, [SlotInfo((0, 1)), SlotInfo((2,)), SlotInfo((3,)), SlotInfo((4,))])
    # layer 1: three experts in one slot, 4 pruned
    t1.set_slots(t1.w_in[[2, 0, 5]], t1.w_out[[2, 0, 5]], [SlotInfo((2, 1, 3)), SlotInfo((0,)), SlotInfo((5,))])
    moeopt.verify(model)
    return model


def reference_like_mixtral() -> torch.nn.Module:
    """Tiny Mixtral configured as scripts/ref_model.py trains the reference model: tied embeddings,
    output_router_logits=True left in the config, one id for bos/eos/pad."""
    import transformers

    from moeopt.testing import tiny_config

    cfg = tiny_config("mixtral")
    cfg.tie_word_embeddings, cfg.output_router_logits, cfg.router_aux_loss_coef = True, True, 0.01
    cfg.bos_token_id = cfg.eos_token_id = cfg.pad_token_id = 3
    torch.manual_seed(0)
    hf = transformers.MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "gate.weight" in n:
                p.normal_(0.0, 0.5)
    return hf


def with_tokenizer(ckpt: Path) -> Path:
    """Write a word-level tokenizer.json (one token per id) into a checkpoint folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(ckpt / "tokenizer.json"))
    return ckpt


def untrained_afmoe() -> MoEModel:
    """AFMoE as transformers initialises it: a zero router, so every token's expert scores tie exactly."""
    import transformers

    from moeopt.testing import tiny_config

    torch.manual_seed(0)
    hf = transformers.AfmoeForCausalLM(tiny_config("afmoe")).eval()
    routers = [m.router.gate.weight.detach() for m in hf.modules() if hasattr(m, "expert_bias")]
    assert routers and all(float(w.abs().max()) == 0.0 for w in routers)
    return moeopt.load(hf)


BUILDERS = {
    "compressed_qwen3": compressed_qwen3,
    "afmoe_untrained": untrained_afmoe,
}

# Quantized artifacts: name -> (base model as `artifact` names it, passes run on it before lowering).
QUANTIZED = {
    "mixtral_q4": ("text_mixtral", "quantize{method=uniform,bits=4,group=16}"),  # has a real tokenizer: eval
    "mixtral_q8": ("mixtral", "quantize{method=uniform,bits=8,group=16,symmetric=true}"),
    # ILP over 2/3/4/8/float on random calibration tokens, with pins so 2-bit, 3-bit and float all occur
    "mixtral_mixed": ("mixtral", "quantize{method=ilp,avg-bits=5,group=16,pin=0:0@2;0:1@3;1:2@float}"),
    # pruned + merged, then 4-bit with a 3-bit and a float slot (intermediate 24: QMoE pads it to 32)
    "compressed_qwen3_q": ("compressed_qwen3", "quantize{method=uniform,bits=4,group=16,pin=0:2@3;1:1@float}"),
}


def _mixtral_ckpt(root: Path) -> Path:
    """The reference-like tiny Mixtral saved with a tokenizer (shared by its float and quantized artifacts)."""
    ckpt = root / "mixtral-ckpt"
    with FileLock(str(ckpt) + ".lock"):
        if not (ckpt / "tokenizer.json").exists():
            reference_like_mixtral().save_pretrained(ckpt)  # type: ignore[operator]
            with_tokenizer(ckpt)
    return ckpt


def _text_ckpt(root: Path) -> Path:
    """A tiny Mixtral with the BPE tokenizer of the data fixtures (as conftest's text_ckpt), for eval."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from tests.conftest import fixture_tokenizer

    ckpt = root / "text-ckpt"
    with FileLock(str(ckpt) + ".lock"):
        if not (ckpt / "tokenizer.json").exists():
            tok = fixture_tokenizer()
            torch.manual_seed(0)
            cfg = MixtralConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                                num_experts_per_tok=2, max_position_embeddings=512, eos_token_id=0, bos_token_id=0)
            hf = MixtralForCausalLM(cfg).eval()
            with torch.no_grad():
                for layer in hf.model.layers:
                    layer.mlp.gate.weight.normal_(0.0, 1.0)
            hf.save_pretrained(ckpt)
            tok.save(str(ckpt / "tokenizer.json"))
    return ckpt


def _build(name: str, root: Path) -> MoEModel:
    if name in QUANTIZED:
        from moeopt.passes import PassManager

        base, passes = QUANTIZED[name]
        model = _build(base, root)
        PassManager(passes, verify_each=True).run(model)
        return model
    if name == "mixtral":  # configured like the reference model, from a folder with a tokenizer
        return moeopt.load(_mixtral_ckpt(root))
    if name == "text_mixtral":
        return moeopt.load(_text_ckpt(root))
    return BUILDERS[name]() if name in BUILDERS else tiny(name)


def artifact(name: str, factory: pytest.TempPathFactory) -> Path:
    """The artifact of tiny `name` (an arch, or a key of BUILDERS / QUANTIZED), lowered once per session."""
    # Under xdist every worker's basetemp sits in one session folder; alone, basetemp is that folder
    # (its parent would be shared with earlier sessions and hand back stale artifacts).
    base = factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "moeopt-artifacts"
    root.mkdir(exist_ok=True)
    out = root / name
    with FileLock(str(out) + ".lock"):
        if not (out / "manifest.json").exists():
            lower(_build(name, root), out, pipeline="test")
    return out


def source_model(name: str, art: Path) -> MoEModel:
    """The PyTorch model an artifact was lowered from (rebuilt: tiny models and the passes are seeded)."""
    return _build(name, art.parent)


def left_padded_batch(lengths: list[int], seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(B, max_len) ids and mask, each row a random prompt of its length, padded on the left."""
    rng = np.random.default_rng(seed)
    t = max(lengths)
    ids = np.zeros((len(lengths), t), dtype=np.int64)
    mask = np.zeros((len(lengths), t), dtype=np.int64)
    for r, n in enumerate(lengths):
        ids[r, t - n:] = rng.integers(0, VOCAB, n)
        mask[r, t - n:] = 1
    return ids, mask


def torch_greedy(model: MoEModel, ids: np.ndarray, mask: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy decoding by full recompute in PyTorch (no cache): (B, steps) tokens, (B, steps, V) logits."""
    seq, m = torch.from_numpy(ids), torch.from_numpy(mask)
    tokens, logits = [], []
    for _ in range(steps):
        pos = (m.cumsum(-1) - 1).masked_fill(m == 0, 1)
        with torch.no_grad():
            kw = no_router_outputs(model.hf)
            out = model.hf(input_ids=seq, attention_mask=m, position_ids=pos, use_cache=False, **kw)
            last = out.logits[:, -1]
        nxt = last.argmax(-1, keepdim=True)
        tokens.append(nxt)
        logits.append(last)
        seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    return torch.cat(tokens, 1).numpy(), torch.stack(logits, 1).numpy()


def assert_decodes_like_torch(sess: Any, model: MoEModel, steps: int, tol: Callable[[np.ndarray], float]) -> None:
    """Greedy decode with the artifact's KV cache vs PyTorch's full recompute: identical tokens and max abs
    logit difference <= tol(reference logits), for a left-padded batch of 4 and a batch of 1 (export saw
    batch 2, 3 new tokens, 4 past)."""
    for lengths in ([9, 5, 7, 1], [6]):
        ids, mask = left_padded_batch(lengths)
        g = sess.generate(ids, steps, attention_mask=mask, stop_tokens=(), keep_logits=True)
        ref_tokens, ref_logits = torch_greedy(model, ids, mask, steps)
        assert np.array_equal(g.sequences[:, ids.shape[1]:], ref_tokens), lengths
        assert np.abs(np.stack(g.step_logits, 1) - ref_logits).max() <= tol(ref_logits), lengths


def manifest(art: Path) -> dict:
    return json.loads((art / "manifest.json").read_text())  # type: ignore[no-any-return]


# --- one MoE layer exported alone (a few seconds) ---------------------------------------------------


def random_layer(router: RouterSpec, experts: ExpertSpec, slots: list[SlotInfo] | None = None,
                 shared: list[SharedSpec] | None = None, router_bias: bool = False) -> MoELayer:
    """A seeded random MoELayer; `slots` picks (members[0]'s weights) and merges experts."""
    g = torch.Generator().manual_seed(7)
    e, f, i, h = router.num_experts, experts.in_rows, experts.intermediate, experts.hidden

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.3

    table = ExpertTable(experts, e, r(e, f, h), r(e, h, i), r(e, f) if experts.bias else None,
                        r(e, h) if experts.bias else None)
    if slots is not None:
        idx = [s.members[0] for s in slots]
        b_in = None if table.b_in is None else table.b_in[idx]
        b_out = None if table.b_out is None else table.b_out[idx]
        table.set_slots(table.w_in[idx], table.w_out[idx], slots, b_in, b_out)
    dense = []
    for spec in shared or []:
        d = DenseExpert(spec, h)
        with torch.no_grad():
            for p in d.parameters():
                p.copy_(r(*p.shape))
        dense.append(d)
    return MoELayer(router, table, r(e, h) * 3, r(e) if router_bias else None,
                    r(e) * 0.3 if router.has_score_bias else None, dense).eval()


class OneLayer(torch.nn.Module):
    def __init__(self, layer: MoELayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)  # type: ignore[no-any-return]


def export_layer(layer: MoELayer, path: Path) -> Any:
    """Export one layer (dynamic batch and sequence; quantized layers through the registered lowering)
    and open it in onnxruntime."""
    import onnxruntime as ort

    from moeopt.ir.layer import layers_as_ops
    from moeopt.lower.translate import layers_by_name, translation_table

    x = torch.randn(2, 5, layer.table.spec.hidden, generator=torch.Generator().manual_seed(1))
    dyn = torch.export.Dim.DYNAMIC
    with layers_as_ops(), layers_by_name({"layer.table.w_in": layer}), torch.no_grad():
        prog = torch.onnx.export(OneLayer(layer).eval(), (x,), dynamo=True, input_names=["x"], verbose=False,
                                 custom_translation_table=translation_table(), dynamic_shapes=({0: dyn, 1: dyn},))
    assert prog is not None
    prog.save(str(path))
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
