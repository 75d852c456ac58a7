"""Fused experts whose own `_apply_gate` is a clamped SwiGLU (DeepSeek-V4, HY-V4, MiniMax-M3) are read
into ExpertSpec's swiglu_* fields, and the IR's experts then compute what the module computes with the
clamp active; a gate that is not of that form stays refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import moeopt
from moeopt.archs import tiny_model
from moeopt.errors import UnsupportedModelError
from moeopt.ir.adapters.base import extract_experts
from moeopt.ir.compute import routed_experts
from moeopt.lower.export import export_decoder

# type -> (limit attribute, expected alpha, expected beta)
CASES = {"deepseek_v4": ("limit", 1.0, 0.0), "hy_v4": ("swiglu_limit", 1.0, 0.0),
         "minimax_m3_vl_text": ("swiglu_limit", None, 1.0)}
LIMIT = 0.05  # far inside the tiny model's activations, so both clamps bite


def _experts(model_type: str) -> torch.nn.Module:
    hf = tiny_model(model_type, layers=1)
    return next(m for n, m in hf.named_modules() if n.endswith("mlp.experts"))


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_clamped_swiglu_experts_match_the_module(model_type: str) -> None:
    torch.set_num_threads(1)
    attr, alpha, beta = CASES[model_type]
    ex = _experts(model_type)
    assert hasattr(ex, attr)  # where transformers keeps the limit its `_apply_gate` reads
    for name in ("limit", "swiglu_limit"):
        if hasattr(ex, name):
            setattr(ex, name, LIMIT)
    with torch.no_grad():
        ex.gate_up_proj.mul_(20)  # gate/up values well past the limit
    parts = extract_experts(ex, None)
    spec = parts.spec
    assert (spec.swiglu_limit, spec.swiglu_beta) == (LIMIT, beta)
    assert spec.swiglu_alpha == (float(ex.swiglu_alpha) if alpha is None else alpha)
    e = int(ex.gate_up_proj.shape[0])
    hidden = int(ex.down_proj.shape[1])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, hidden, generator=g)
    idx = torch.randint(0, e, (12, 2), generator=g)
    w = torch.rand(12, 2, generator=g)
    with torch.no_grad():
        ref = ex(x, idx, w)
        got = routed_experts(x, idx, w, parts.w_in, parts.w_out, parts.b_in, parts.b_out, spec)
        # without the clamp the outputs differ: the probe exercises it
        plain = routed_experts(x, idx, w, parts.w_in, parts.w_out, parts.b_in, parts.b_out,
                               type(spec)(**{**spec.to_dict(), "swiglu_limit": None}))
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(plain, ref, rtol=1e-3, atol=1e-4)


def test_a_gate_that_is_not_a_clamped_swiglu_is_refused() -> None:
    ex = _experts("hy_v4")

    def gate(gate_up: torch.Tensor) -> torch.Tensor:  # clamps, but gelu: not expressible
        g, u = gate_up.chunk(2, dim=-1)
        return torch.nn.functional.gelu(g.clamp(max=ex.swiglu_limit)) * u.clamp(-ex.swiglu_limit, ex.swiglu_limit)

    ex._apply_gate = gate  # type: ignore[method-assign]
    with pytest.raises(UnsupportedModelError, match="custom gating function"):
        extract_experts(ex, None)


def test_minimax_m3_with_active_clamps_lowers_and_matches_transformers(tmp_path: Path) -> None:
    """MiniMax-M3's clamped SwiGLU in its routed experts and its fused shared expert, end to end: the
    limit is lowered until it bites, so load and plain ORT must reproduce the clamps, not skip them."""
    torch.set_num_threads(1)
    hf = tiny_model("minimax_m3_vl_text", layers=1)
    clamped = 0
    for m in hf.modules():
        if hasattr(m, "swiglu_limit"):
            m.swiglu_limit = LIMIT
            clamped += 1
            if hasattr(m, "limit"):
                m.limit = LIMIT
    assert clamped >= 2  # the routed experts and the shared expert
    ids = torch.randint(3, 97, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits.numpy()
    model = moeopt.load(hf)
    with torch.no_grad():
        assert np.abs(model(input_ids=ids).logits.numpy() - ref).max() <= 1e-5
    info = export_decoder(model, tmp_path / "model.onnx", kv_cache=True)
    assert info.cache is not None
    feed = {"input_ids": ids.numpy(), "attention_mask": np.ones((1, 6), np.int64),
            "position_ids": np.arange(6, dtype=np.int64)[None]}
    feed.update({name: t.numpy() for name, t in zip(info.inputs[3:], info.cache.empty(1, 0), strict=True)})
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert np.abs(sess.run(["logits"], feed)[0] - ref).max() <= 1e-4
