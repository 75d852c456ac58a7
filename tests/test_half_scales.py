"""Float16 block scales (`quantize{scale-dtype=float16}`): rounded before the codes are chosen, so the
stored model computes exactly what PyTorch does; stored as float16 in the artifact's graph (half the scale
bytes), which still verifies and decodes like the source; out-of-range scales and streaming are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import moeopt
from moeopt.errors import BadInputError
from moeopt.lower.half_scales import SCALE_INPUTS
from moeopt.passes import PassContext, PassManager
from moeopt.quant.gptq import Hessian, gptq
from moeopt.quant.groupwise import (
    ScaleRangeError,
    codes,
    dequantize,
    matrix_bytes,
    quantize,
    quantize_dequantize,
    scale_storage,
    zero_points,
)
from moeopt.testing import tiny_model

HALF = torch.float16


def _w(rows: int = 48, cols: int = 192, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02


@pytest.mark.parametrize(("bits", "group", "symmetric", "search"), [(4, 64, False, False), (4, 32, True, True),
                                                                   (2, 16, False, True), (8, 64, False, False)])
def test_scales_are_rounded_before_the_codes(bits: int, group: int, symmetric: bool, search: bool) -> None:
    w = _w()
    with scale_storage(HALF):
        q, deq = quantize_dequantize(w, bits, group, symmetric, search)
        assert q.nbytes() == matrix_bytes(48, 192, bits, group, symmetric)  # counted at 2 bytes a scale
    assert q.scales.dtype == HALF
    full = quantize(w, bits, group, symmetric, search)
    kb = 192 // group
    assert full.nbytes() - q.nbytes() == 48 * kb * 2  # half the scale bytes, nothing else
    # what PyTorch computes with is exactly the stored codes against the stored float16 scales ...
    stored = (codes(q).float() - zero_points(q)[..., None]) * q.scales.float()[..., None]
    assert torch.equal(deq, stored.reshape(48, -1)) and torch.equal(deq, dequantize(q))
    # ... and the codes are the nearest ones to w on that grid (rounded after the scale, not before)
    grid = torch.round(w.reshape(48, kb, group) / q.scales.float()[..., None]) + zero_points(q)[..., None]
    assert torch.equal(codes(q).float(), grid.clamp(0, 2**bits - 1))
    # rounding the scale costs at most a little of the quantization error
    e_half, e_full = float((deq - w).pow(2).mean()), float((dequantize(full) - w).pow(2).mean())
    assert e_half <= 1.05 * e_full, (e_half, e_full)


def test_gptq_stores_float16_scales_it_compensated_with() -> None:
    w, x = _w(32, 128, 1), torch.randn(512, 128, generator=torch.Generator().manual_seed(2))
    h = Hessian(128)
    h.add(x)
    for act_order in (True, False):
        with scale_storage(HALF):
            q = gptq(w, h.value(), 4, 32, False, act_order=act_order)
        assert q.scales.dtype == HALF
        grid = (codes(q).float() - zero_points(q)[..., None]) * q.scales.float()[..., None]
        assert torch.equal(dequantize(q), grid.reshape(32, -1))
        rtn = quantize(w, 4, 32, False)
        err = {n: float(((m - w) @ x.T).pow(2).mean()) for n, m in (("gptq", dequantize(q)), ("rtn", dequantize(rtn)))}
        assert err["gptq"] < err["rtn"], err


def test_a_scale_beyond_float16_is_refused() -> None:
    with scale_storage(HALF), pytest.raises(ScaleRangeError, match="does not fit float16"):
        quantize(torch.full((2, 16), 1e6), 4, 16, False)
    model = moeopt.load(tiny_model("mixtral"))
    with torch.no_grad():
        model.layers[0].table.w_in[0, 0, 0] = 1e7
    with pytest.raises(BadInputError, match=r"scale-dtype=float16.*does not fit float16; store scales as float32"):
        PassManager("quantize{method=uniform,bits=4,group=16,scale-dtype=float16}").run(model)


def _scale_initializers(path: Path) -> dict[str, np.ndarray]:
    """The scale inputs of every MatMulNBits / QMoE node, through their Cast when there is one."""
    g = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    cast = {n.output[0]: n.input[0] for n in g.node if n.op_type == "Cast"}
    names = [n.input[i] for n in g.node if n.domain == "com.microsoft" for i in SCALE_INPUTS.get(n.op_type, ())
             if i < len(n.input) and n.input[i]]
    return {name: inits[cast.get(name, name)] for name in names}


def test_float16_scales_lower_to_float16_initializers_that_verify_and_decode(tmp_path: Path) -> None:
    from moeopt.lower import lower
    from moeopt.runtime import Session
    from tests.lower_helpers import assert_decodes_like_torch, manifest

    model = moeopt.load(tiny_model("mixtral"))
    PassManager("quantize{method=uniform,bits=4,group=16,scale-dtype=float16,non-experts=4,lm-head=true}",
                ctx=PassContext()).run(model)
    art = lower(model, tmp_path / "art", pipeline="test")  # verify=True: refused beyond the parity tolerance
    m = manifest(art)
    assert m["verified"] is True and m["parity_measured"] <= 1e-3, m["parity_measured"]
    scales = _scale_initializers(art / "model.onnx")
    quantized = [q for layer in model.layers for q in layer.table.quantized.values()] + list(model.linears.values())
    assert scales and all(a.dtype == np.float16 for a in scales.values())  # every one stored as float16
    assert sum(a.size for a in scales.values()) == sum(q.scales.numel() for q in quantized)
    # the source's exact float16 values, bit for bit, in the file
    stored = np.sort(np.concatenate([a.reshape(-1) for a in scales.values()]))
    assert np.array_equal(stored, np.sort(torch.cat([q.scales.reshape(-1) for q in quantized]).numpy()))
    assert_decodes_like_torch(Session(art), model, 6, lambda ref: 1e-3)


def test_only_exact_float16_scales_are_rewritten_and_outputs_stay_equal(tmp_path: Path) -> None:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from moeopt.lower.half_scales import store_half_scales

    rng = np.random.default_rng(0)
    n, k, block = 8, 32, 16
    inits = [numpy_helper.from_array(rng.integers(0, 256, (n, k // block, block // 2), dtype=np.uint8), "B")]
    exact = (rng.random(n * k // block) * 0.01).astype(np.float16).astype(np.float32)
    inexact = exact + np.float32(1e-7)  # between two float16 values: must stay float32
    inits += [numpy_helper.from_array(exact, "s_exact"), numpy_helper.from_array(inexact, "s_inexact")]
    nodes = [helper.make_node("MatMulNBits", ["x", "B", s], [f"y{i}"], domain="com.microsoft", K=k, N=n, bits=4,
                              block_size=block) for i, s in enumerate(("s_exact", "s_inexact"))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, n]) for i in range(2)],
                              inits)
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("com.microsoft", 1)]), str(path))
    x = rng.standard_normal((1, k)).astype(np.float32)
    before = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert store_half_scales(path) == exact.nbytes // 2
    assert {n: a.dtype for n, a in _scale_initializers(path).items()} == {"s_exact": np.float16,
                                                                         "s_inexact": np.float32}
    assert not (tmp_path / "m.onnx.data").exists()  # an inline graph stays inline
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        after = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})
        assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    assert store_half_scales(path) == 0  # nothing left to rewrite
