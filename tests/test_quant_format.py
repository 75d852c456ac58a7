"""Group-wise quantization: the reference formula, the bit packing, and ONNX Runtime's MatMulNBits on our bytes."""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from moeopt.quant.groupwise import (
    blob_size,
    codes,
    dequantize,
    k_blocks,
    matrix_bytes,
    pack_bits,
    quantize,
    quantize_dequantize,
    unpack_bits,
)


def reference(w: torch.Tensor, bits: int, group: int, symmetric: bool) -> torch.Tensor:
    """The module docstring's formula, written out block by block in plain float32 scalars."""
    m, h = 2**bits - 1, 2 ** (bits - 1)
    rows, cols = w.shape
    out = torch.zeros(rows, cols)
    f32 = np.float32
    for r in range(rows):
        for b0 in range(0, cols, group):
            blk = [f32(v) for v in w[r, b0 : b0 + group].tolist()]
            blk += [f32(0)] * (group - len(blk))  # zero padding of the last block
            if symmetric:
                a = max(blk, key=abs)  # first value of largest magnitude
                scale, zp = f32(a / f32(-h)), f32(h)
            else:
                lo, hi = min(min(blk), f32(0)), max(max(blk), f32(0))
                scale = f32((hi - lo) / f32(m))
                zp = f32(0) if scale == 0 else f32(min(max(np.round(f32(-lo / scale)), 0), m))
            for j in range(b0, min(b0 + group, cols)):
                q = zp if scale == 0 else f32(min(max(np.round(f32(blk[j - b0] / scale)) + zp, 0), m))
                out[r, j] = float(f32((q - zp) * scale))
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [16, 32])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("cols", [32, 40])
def test_dequantize_equals_reference_formula_exactly(bits: int, group: int, symmetric: bool, cols: int) -> None:
    w = torch.randn(6, cols, generator=torch.Generator().manual_seed(bits * 100 + cols)) * 0.05
    w[0, :group] = 0.0  # an all-zero block
    w[1, :] = w[1, :].abs()  # all-positive rows: the range must still include 0
    q = quantize(w, bits, group, symmetric)
    assert torch.equal(dequantize(q), reference(w, bits, group, symmetric))
    c = codes(q)
    assert int(c.min()) >= 0 and int(c.max()) <= 2**bits - 1
    assert q.packed.dtype == torch.uint8 and q.packed.shape == (6, k_blocks(cols, group) * blob_size(bits, group))
    zp_bytes = 0 if q.zero_points is None else q.zero_points.numel()
    assert q.nbytes() == q.packed.numel() + 4 * q.scales.numel() + zp_bytes


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_error_is_bounded_by_half_a_step(bits: int) -> None:
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    for symmetric in (True, False):
        q = quantize(w, bits, 32, symmetric)
        step = q.scales.abs().repeat_interleave(32, dim=1)  # (8, 64)
        err = (dequantize(q) - w).abs()
        # Values beyond the grid (the opposite sign's largest value in symmetric mode) clamp by one step.
        assert bool((err <= step * (1.0 if symmetric else 0.5) + 1e-6).all())


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), rows=st.integers(1, 4), n=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(bits: int, rows: int, n: int, seed: int) -> None:
    vals = torch.randint(0, 2**bits, (rows, n), generator=torch.Generator().manual_seed(seed))
    packed = pack_bits(vals, bits)
    assert packed.shape == (rows, math.ceil(n * bits / 8))
    assert torch.equal(unpack_bits(packed, bits, n), vals)


def test_packing_is_low_bits_first() -> None:
    # ORT's 4-bit layout: element 2i in the low nibble, 2i+1 in the high nibble of byte i.
    assert pack_bits(torch.tensor([[1, 2, 3, 4]]), 4).tolist() == [[0x21, 0x43]]
    assert pack_bits(torch.tensor([[1, 2, 3, 0]]), 2).tolist() == [[0b00111001]]
    assert pack_bits(torch.tensor([[7, 0, 0, 0, 0, 0, 0, 5]]), 3).tolist() == [[0x07, 0x00, 0xA0]]


def _bit_stream_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The layout rule spelled out: one bit per element, value j at bits [j*bits, (j+1)*bits), LSB first."""
    rows, n = codes.shape
    stream = ((codes[..., None] >> torch.arange(bits)) & 1).reshape(rows, n * bits)
    stream = torch.nn.functional.pad(stream, (0, -(n * bits) % 8)).reshape(rows, -1, 8)
    return (stream << torch.arange(8)).sum(-1).to(torch.uint8)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_chunked_packing_equals_the_bit_stream(bits: int) -> None:
    # pack_bits works a byte (or 3 bytes for 3-bit) at a time; every row length, padding included.
    gen = torch.Generator().manual_seed(bits)
    for n in range(1, 30):
        vals = torch.randint(0, 2**bits, (3, n), generator=gen)
        assert torch.equal(pack_bits(vals, bits), _bit_stream_pack(vals, bits))
        assert torch.equal(unpack_bits(_bit_stream_pack(vals, bits), bits, n), vals)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_dequantize_is_dequantize_of_quantize(bits: int, symmetric: bool) -> None:
    w = torch.randn(7, 40, generator=torch.Generator().manual_seed(bits)) * 0.05
    w[0, :16] = 0.0  # a zero block (scale 0)
    q, deq = quantize_dequantize(w, bits, 16, symmetric)
    ref = quantize(w, bits, 16, symmetric)
    assert torch.equal(q.packed, ref.packed) and torch.equal(q.scales, ref.scales)
    assert torch.equal(deq, dequantize(ref))  # bit for bit: the quantize pass stores this as the weights


def _matmul_nbits(x: np.ndarray, q: object, bits: int, group: int) -> np.ndarray:
    """Run com.microsoft.MatMulNBits on the packed bytes in a one-node ONNX graph."""
    n, k = q.rows, q.cols  # type: ignore[attr-defined]
    kb = k_blocks(k, group)
    inits = [numpy_helper.from_array(q.packed.numpy().reshape(n, kb, -1), "B"),  # type: ignore[attr-defined]
             numpy_helper.from_array(q.scales.numpy().reshape(-1), "scales")]  # type: ignore[attr-defined]
    inputs = ["A", "B", "scales"]
    if q.zero_points is not None:  # type: ignore[attr-defined]
        inits.append(numpy_helper.from_array(q.zero_points.numpy().reshape(-1), "zp"))  # type: ignore[attr-defined]
        inputs.append("zp")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=group)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [x.shape[0], n])], inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"A": x})[0]  # type: ignore[no-any-return]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [16, 32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_onnxruntime_matmulnbits_reads_our_bytes(bits: int, group: int, symmetric: bool) -> None:
    gen = torch.Generator().manual_seed(bits + group)
    w = torch.randn(48, 160, generator=gen)  # (N, K) nn.Linear layout; K=160 is not a multiple of 64/128
    x = torch.randn(5, 160, generator=gen)  # (M, K)
    q = quantize(w, bits, group, symmetric)
    y = _matmul_nbits(x.numpy(), q, bits, group)  # (M, N)
    ref = (x.double() @ dequantize(q).double().T).numpy()
    assert np.abs(y - ref).max() < 1e-4 * max(1.0, float(np.abs(ref).max()))


def test_matrix_bytes_formula() -> None:
    # 4-bit, group 32, (64, 100): 4 blocks of 16 bytes, 4 fp32 scales, zero points in 2 bytes per row.
    assert matrix_bytes(64, 100, 4, 32, symmetric=False) == 64 * (4 * 16 + 4 * 4 + 2)
    assert matrix_bytes(64, 100, 3, 32, symmetric=True) == 64 * (4 * 12 + 4 * 4)


def test_bad_format_is_rejected() -> None:
    with pytest.raises(ValueError, match="bits"):
        quantize(torch.zeros(2, 32), 5, 32, True)
    with pytest.raises(ValueError, match="group"):
        quantize(torch.zeros(2, 32), 4, 24, True)
