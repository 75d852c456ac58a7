"""gpt-oss: its clamped SwiGLU gate, MXFP4 checkpoints as shipped, and its lowering (float and 4-bit).

Load parity against transformers (and the save/load round trip) is in test_ir_equivalence (gpt_oss is
LISTED). The tiny config has a sliding window of 4 and a SwiGLU limit of 2, so the prompts below cross
the window and the random experts hit both clamps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import moeopt
from moeopt.ir import mxfp4
from moeopt.ir.compute import clamped_swiglu
from moeopt.ir.spec import ExpertSpec, RouterSpec
from moeopt.lower import lower
from moeopt.passes import PassManager
from moeopt.runtime import Session
from moeopt.testing import tiny_model
from tests.conftest import model_inputs
from tests.lower_helpers import assert_decodes_like_torch, export_layer, manifest, random_layer

TOL = 1e-3  # max abs logit difference, artifact vs PyTorch (measured ~1e-7)
Q_TOL = 1e-4  # 4-bit QMoE with fp32 activations vs the dequantized model (as tests/test_lower_quant.py)
GPT_OSS = ExpertSpec(16, 8, "silu", bias=True, swiglu_alpha=1.702, swiglu_beta=1.0, swiglu_limit=0.5)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits  # type: ignore[no-any-return]


def test_clamped_swiglu_is_transformers_gate() -> None:
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    cfg = tiny_model("gpt_oss").config
    experts = GptOssExperts(cfg)
    gate_up = torch.randn(64, 2 * cfg.intermediate_size, generator=torch.Generator().manual_seed(0)) * 4
    spec = ExpertSpec(cfg.hidden_size, cfg.intermediate_size, "silu", bias=True, swiglu_alpha=cfg.swiglu_alpha,
                      swiglu_beta=1.0, swiglu_limit=cfg.swiglu_limit)
    ours = clamped_swiglu(gate_up[:, 0::2], gate_up[:, 1::2], spec)
    assert (gate_up.abs() > cfg.swiglu_limit).float().mean() > 0.3  # the clamps are exercised
    assert torch.equal(ours, experts._apply_gate(gate_up))
    with pytest.raises(ValueError, match="SiLU-gated GLU"):
        ExpertSpec(16, 8, "gelu", swiglu_limit=7.0)
    assert "swiglu_alpha" not in ExpertSpec(16, 8, "silu").to_dict()  # plain specs serialise as before


def test_load_maps_gpt_oss_onto_the_ir() -> None:
    hf = tiny_model("gpt_oss")
    kw = model_inputs("gpt_oss")
    model = moeopt.load(hf)
    assert model.adapters == {"GptOssMLP": "gpt_oss"}
    layer = model.layers[0]
    spec = layer.table.spec
    assert (spec.swiglu_alpha, spec.swiglu_beta, spec.swiglu_limit) == (1.702, 1.0, 2.0) and spec.bias
    assert layer.router == RouterSpec(4, 2, "topk_softmax", has_bias=True, logits_fp32=False)
    assert layer.tuple_output  # GptOssDecoderLayer unpacks `hidden, _ = mlp(hidden)`
    assert (_logits(model.hf, kw["input_ids"]) - _logits(hf, kw["input_ids"])).abs().max() <= 1e-5
    # bf16 (as shipped): router logits in the model's dtype and biases added after each matmul, as the
    # source does, or the conversion check (1e-5) fails and the layer is refused
    bf16 = tiny_model("gpt_oss").to(torch.bfloat16)
    ids = kw["input_ids"]
    assert torch.equal(_logits(moeopt.load(bf16, dtype=torch.bfloat16).hf, ids), _logits(bf16, ids))


def test_mxfp4_checkpoint_loads_dequantized(tmp_path: Path) -> None:
    """A checkpoint in the shipped layout (experts as *_blocks / *_scales, quant_method mxfp4) loads, and
    its experts are exactly the dequantized MXFP4 values; transformers reads our packing the same way."""
    from transformers import AutoModelForCausalLM, Mxfp4Config
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    w = torch.randn(3, 64, 96, generator=torch.Generator().manual_seed(0))
    blocks, scales = mxfp4.quantize(w)
    assert blocks.shape == (3, 64, 3, 16) and scales.shape == (3, 64, 3) and blocks.dtype == torch.uint8
    deq = mxfp4.dequantize(blocks, scales)
    assert torch.equal(deq.transpose(1, 2), convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    assert (deq - w).abs().max() <= 0.25 * w.abs().max()  # E2M1: 1 mantissa bit, a shared power of 2

    hf = tiny_model("gpt_oss")
    ref = mxfp4.write_mxfp4_checkpoint(hf, tmp_path / "ck")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ck" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.experts.gate_up_proj_blocks" in keys
    assert "model.layers.0.mlp.experts.down_proj_scales" in keys
    assert "model.layers.0.mlp.experts.gate_up_proj" not in keys

    ids = model_inputs("gpt_oss")["input_ids"]
    model = moeopt.load(tmp_path / "ck")
    assert torch.equal(_logits(model.hf, ids), _logits(ref, ids))
    t = model.layers[1].table
    e = ref.model.layers[1].mlp.experts
    assert torch.equal(t.w_out, e.down_proj.detach().transpose(1, 2))
    hf2 = AutoModelForCausalLM.from_pretrained(tmp_path / "ck", quantization_config=Mxfp4Config(dequantize=True))
    assert torch.equal(_logits(hf2.float().eval(), ids), _logits(ref, ids))


@pytest.mark.parametrize("k", [2, 9])
def test_clamped_swiglu_layer_lowers_exactly(k: int, tmp_path: Path) -> None:
    """k=2: one com.microsoft.MoE node with biases and the swiglu attributes; k=9 (over the kernel's 8):
    plain ONNX ops."""
    layer = random_layer(RouterSpec(10, k, "topk_softmax", has_bias=True), GPT_OSS, router_bias=True)
    sess = export_layer(layer, tmp_path / "layer.onnx")
    nodes = [n for n in onnx.load(str(tmp_path / "layer.onnx")).graph.node if n.op_type == "MoE"]
    if k == 2:
        assert len(nodes) == 1
        attrs = {a.name: a.f for a in nodes[0].attribute if a.type == onnx.AttributeProto.FLOAT}
        assert attrs == pytest.approx({"activation_alpha": 1.702, "activation_beta": 1.0, "swiglu_limit": 0.5})
    else:
        assert not nodes
    for shape in ((1, 1, 16), (3, 7, 16)):
        xs = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[1])) * 3
        with torch.no_grad():
            ref = layer(xs).numpy()
        assert np.abs(sess.run(None, {"x": xs.numpy()})[0] - ref).max() <= 1e-5


@pytest.mark.parametrize(("hidden", "kernel"), [(32, "com.microsoft.QMoE"), (24, "com.microsoft.MatMulNBits")])
def test_quantized_clamped_swiglu_layer_lowers_exactly(hidden: int, kernel: str, tmp_path: Path) -> None:
    """4-bit, widened 3-bit and a float slot (a MoE node with biases) in one layer; hidden 24 is not whole
    QMoE blocks, so the quantized slots go through MatMulNBits and the clamped SwiGLU as plain ops."""
    from moeopt.lower.onnx_quant import plan
    from moeopt.quant.apply import quantize_slot

    spec = ExpertSpec(hidden, 16, "silu", bias=True, swiglu_alpha=1.702, swiglu_beta=1.0, swiglu_limit=0.5)
    layer = random_layer(RouterSpec(4, 2, "topk_softmax", has_bias=True), spec, router_bias=True)
    for slot, bits in enumerate([4, None, 4, 3]):
        quantize_slot(layer.table, slot, bits, 16, False)
    assert {g.op for g in plan(layer)} == {kernel, "com.microsoft.MoE"}
    sess = export_layer(layer, tmp_path / "layer.onnx")
    xs = torch.randn(3, 7, hidden, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        ref = layer(xs).numpy()
    assert np.abs(sess.run(None, {"x": xs.numpy()})[0] - ref).max() <= 1e-5


@pytest.mark.parametrize("bits", [None, 4])
def test_offload_cold_graph_computes_clamped_swiglu_experts(bits: int | None) -> None:
    """The offload mode's cold experts (one MoE / QMoE node fed the pool) keep the biases and the clamped
    SwiGLU: its output is the sw-weighted sum of the layer's experts (a whole offload artifact of the tiny
    gpt-oss decodes like PyTorch too, ~3e-7; not run here: a minute per export)."""
    import onnxruntime as ort

    from moeopt.ir.compute import _dense
    from moeopt.lower.expert_file import _moe_parts, _qmoe_parts, cold_graph
    from moeopt.lower.onnx_quant import Group, plan
    from moeopt.quant.apply import quantize_slot
    from moeopt.runtime.offload_format import Part, PoolFormat

    layer = random_layer(RouterSpec(4, 2, "topk_softmax", has_bias=True), GPT_OSS, router_bias=True)
    if bits is None:
        group = Group((0, 1, 2, 3), None, "com.microsoft.MoE")
        arrays, attrs = _moe_parts(layer, group)
    else:
        for slot in range(4):
            quantize_slot(layer.table, slot, bits, 16, False)
        group = plan(layer)[0]
        arrays, attrs = _qmoe_parts(layer, group)
    assert {"fc1_bias", "fc2_bias"} <= set(arrays) and attrs["swiglu_limit"] == 0.5
    parts = tuple(Part(n, tuple(a.shape[1:]), str(a.dtype)) for n, a in arrays.items())
    model = cold_graph(PoolFormat("f", group.op, "f.onnx", parts), attrs, 2)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 16, generator=g) * 3
    sw = torch.zeros(5, 4)
    sw[torch.arange(5), torch.tensor([0, 1, 2, 3, 0])] = 0.7
    sw[torch.arange(5), torch.tensor([2, 3, 0, 1, 1])] = 0.3
    out = sess.run(None, {"x": x.numpy(), "sw": sw.numpy(), **arrays})[0]
    t = layer.table
    ref = sum(sw[:, s:s + 1] * _dense(x, t.w_in[s], t.w_out[s], t.b_in[s], t.b_out[s], "silu", True, t.spec)
              for s in range(4))
    assert np.abs(out - ref.numpy()).max() <= 1e-5


def test_artifact_decodes_like_pytorch(tmp_path: Path) -> None:
    """Float artifact: sinks and the sliding window survive the export (prompts of 9 and 6 tokens and 32
    greedy steps with the KV cache, window 4), experts as com.microsoft.MoE."""
    model = moeopt.load(tiny_model("gpt_oss"))
    lower(model, tmp_path / "art")
    m = manifest(tmp_path / "art")
    assert m["graph"]["moe_nodes"] == len(model.layers) == 2
    assert_decodes_like_torch(Session(tmp_path / "art"), model, 32, lambda ref: TOL)


def test_quantized_artifact_decodes_like_the_dequantized_model(tmp_path: Path) -> None:
    """quantize{bits=4} then lower: one QMoE node per layer with the clamped SwiGLU attributes."""
    model = moeopt.load(tiny_model("gpt_oss"))
    PassManager("quantize{method=uniform,bits=4,group=16}", verify_each=True).run(model)
    lower(model, tmp_path / "art")
    m = manifest(tmp_path / "art")
    assert [g["op"] for la in m["layers"] for g in la["groups"]] == ["com.microsoft.QMoE"] * 2
    assert_decodes_like_torch(Session(tmp_path / "art"), model, 32, lambda ref: Q_TOL)


def test_gqa_sinks_and_sliding_window_decode_like_pytorch(tmp_path: Path) -> None:
    """attention=gqa on gpt-oss (head_dim 16 for ORT's CPU kernel, window 4, random sinks, YaRN): one
    GroupQueryAttention per layer with head_sink, local_window_size the window on the sliding layer and -1
    on the full one; greedy tokens equal transformers' across the window. With window - 1 the logits
    differ from the 4th position on (0.09 measured), which the parity check at lower time refuses."""
    import transformers

    from moeopt.testing import tiny_config

    cfg = tiny_config("gpt_oss")
    cfg.head_dim = 16
    torch.manual_seed(0)
    hf = transformers.GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "router.weight" in n:
                p.normal_(0.0, 0.5)
            elif ".experts." in n:
                p.normal_(0.0, 0.5 if n.endswith("gate_up_proj") else 0.2)
            elif n.endswith("sinks"):
                p.normal_(0.0, 1.0)
    lower(moeopt.load(hf), tmp_path / "art", attention="gqa")
    sess = Session(tmp_path / "art")
    assert sess.attention == "gqa" and sess.manifest["parity_measured"] <= 1e-5
    graph = onnx.load(str(tmp_path / "art" / "model.onnx"), load_external_data=False).graph
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    windows = [next(a.i for a in n.attribute if a.name == "local_window_size") for n in gqa]
    assert windows == [cfg.sliding_window, -1]  # layer_types: sliding, full
    assert all(len(n.input) == 12 and n.input[11] for n in gqa)  # head_sink fed
    ids = np.random.default_rng(3).integers(1, 97, (1, 7))  # 7 + 12 tokens: well past the window of 4
    with torch.no_grad():
        ref = hf.generate(torch.from_numpy(ids), max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    np.testing.assert_array_equal(sess.generate(ids, 12, stop_tokens=()).sequences, ref.numpy())
