"""Loading into the IR is exact: every architecture, fresh and after a save/load round trip, and traced."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import moeopt
from moeopt.testing import DETECTED, LISTED, tiny_model
from tests.conftest import model_inputs

TOL = 1e-5  # fp32 max abs, against transformers' default experts implementation


def _logits(model: torch.nn.Module, kw: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**kw, use_cache=False).logits  # type: ignore[no-any-return]


def _eager(hf: torch.nn.Module) -> None:
    for m in hf.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_experts_implementation"):
            cfg._experts_implementation = "eager"


@pytest.mark.parametrize("arch", LISTED + DETECTED)
def test_load_matches_transformers(arch: str, tmp_path: Path) -> None:
    hf = tiny_model(arch)
    kw = model_inputs(arch)
    ref = _logits(hf, kw)
    model = moeopt.load(hf)
    assert len(model.layers) >= 1
    moeopt.verify(model)
    out = _logits(model, kw)
    assert (out - ref).abs().max().item() <= TOL
    # Against transformers' eager experts loop the IR is bit-identical (same ops, same order).
    _eager(hf)
    if arch != "granitemoe":  # routing is softmax-then-topk here vs topk-then-softmax there: equal within 1 ulp
        assert torch.equal(_logits(hf, kw), out)
    model.save(tmp_path / "ck")
    again = moeopt.load(tmp_path / "ck")
    assert torch.equal(_logits(again, kw), out)
    assert [layer.meta() for layer in again.layers] == [layer.meta() for layer in model.layers]


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3", "switch_transformers", "glm4_moe"])
def test_trace_has_one_node_per_moe_layer(arch: str) -> None:
    model = moeopt.load(tiny_model(arch))
    kw = model_inputs(arch, batch=1, seq=6)
    program = moeopt.trace(model, kw if arch == "switch_transformers" else kw["input_ids"])
    nodes = moeopt.moe_nodes(program)
    assert len(nodes) == len(model.layers)
    text = str(program.graph)
    assert sum("moeopt.moe_layer" in line for line in text.splitlines()) == len(model.layers)
    with torch.no_grad():
        assert torch.equal(program.module()(**kw), _logits(model, kw))


def test_trace_dynamic_shapes() -> None:
    model = moeopt.load(tiny_model("qwen3_moe"))
    program = moeopt.trace(model, torch.ones(2, 5, dtype=torch.long), dynamic=True)
    kw = model_inputs("qwen3_moe", batch=3, seq=9)
    with torch.no_grad():
        out = program.module()(**kw)
    assert (out - _logits(model, kw)).abs().max().item() <= TOL


def test_reload_from_hf_checkpoint_folder(tiny_ckpt: Path) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_ckpt).eval()
    kw = model_inputs("mixtral")
    model = moeopt.load(tiny_ckpt)
    assert (_logits(model, kw) - _logits(hf, kw)).abs().max().item() <= TOL
    assert model.source_dir == tiny_ckpt


def test_load_in_place_and_copy() -> None:
    hf = tiny_model("mixtral")
    kept = moeopt.load(hf)
    assert type(hf.model.layers[0].mlp).__name__ == "MixtralSparseMoeBlock"  # copy by default
    same = moeopt.load(hf, inplace=True)
    assert same.hf is hf and isinstance(hf.model.layers[0].mlp, moeopt.MoELayer)
    assert kept.hf is not hf


def test_generation_with_kv_cache_matches() -> None:
    hf = tiny_model("qwen2_moe")
    model = moeopt.load(hf)
    ids = model_inputs("qwen2_moe", batch=1, seq=5)["input_ids"]
    a = hf.generate(ids, max_new_tokens=8, do_sample=False)
    b = model.hf.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(a, b)


def test_stats_split_experts_from_the_rest() -> None:
    model = moeopt.load(tiny_model("mixtral"))
    s = model.stats()
    total = sum(p.numel() for p in model.hf.parameters())
    assert s.total == total
    # 2 layers x 4 experts x (2*48*32 + 32*48)
    assert s.expert == 2 * 4 * (2 * 48 * 32 + 32 * 48)
    assert s.expert_active == s.expert // 2  # top-2 of 4


def test_models_trained_with_router_logits_still_run(tmp_path: Path) -> None:
    """A checkpoint saved with output_router_logits=True (aux-loss training) must load and run, and compute
    what transformers computes with that config: from the module, from its folder, and after a save."""
    hf = tiny_model("mixtral")
    hf.config.output_router_logits = True
    hf.save_pretrained(tmp_path / "aux")
    kw = model_inputs("mixtral")
    ref = _logits(hf, kw)  # transformers itself, router logits on (the load-balancing loss is computed)
    assert ref.shape == (2, 11, 97)
    for model in (moeopt.load(hf), moeopt.load(tmp_path / "aux")):
        assert len(model.layers) == hf.config.num_hidden_layers  # every block became an MoELayer
        assert (model.logits(kw["input_ids"]) - ref).abs().max().item() <= TOL
        model.save(tmp_path / "ck", overwrite=True)
        assert (moeopt.load(tmp_path / "ck").logits(kw["input_ids"]) - ref).abs().max().item() <= TOL
