"""ONNX Runtime's `com.microsoft.QMoE` reads our packed experts as they are (stacked per slot).

Measured on onnxruntime 1.32 CPU: 4-bit (every group) and 2-bit with group 16 are exact against the
dequantized weights with fp32 activations; 8-bit and 2-bit with groups >= 32 run int8-activation kernels
(~1% relative error, whatever the layout); 3-bit needs fp16 activations, block 32-128, no zero points and
`weights_prepacked=0`. A wrong layout would give errors of order 100%, so the bounds below separate the two.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from moeopt.quant.groupwise import Quantized, dequantize, quantize

E, H, INTER, K, T = 4, 64, 64, 2, 6


def _qmoe(bits: int, group: int, symmetric: bool, half: bool) -> tuple[float, float]:
    """Max abs difference between QMoE on our bytes and the dequantized reference, and the output scale."""
    gen = torch.Generator().manual_seed(bits * 1000 + group)
    w1 = torch.randn(E, 2 * INTER, H, generator=gen) * 0.1  # (E, 2I, H) gate rows then up rows
    w2 = torch.randn(E, H, INTER, generator=gen) * 0.1  # (E, H, I)
    # swiglu_fusion=1 wants gate/up rows interleaved: a row permutation, the packed rows move as they are.
    perm = torch.stack([torch.arange(INTER), torch.arange(INTER) + INTER], 1).reshape(-1)  # (2I,)
    q1 = [quantize(w1[e][perm], bits, group, symmetric) for e in range(E)]
    q2 = [quantize(w2[e], bits, group, symmetric) for e in range(E)]
    fdt = np.float16 if half else np.float32

    def stack(qs: list[Quantized], attr: str, dtype: type = np.uint8) -> np.ndarray:
        return np.stack([getattr(q, attr).numpy().astype(dtype) for q in qs])

    inits = [numpy_helper.from_array(stack(q1, "packed"), "fc1"),  # (E, 2I, kb * blob): MatMulNBits rows
             numpy_helper.from_array(stack(q1, "scales", fdt), "s1"),  # (E, 2I, kb)
             numpy_helper.from_array(stack(q2, "packed"), "fc2"),  # (E, H, kb2 * blob)
             numpy_helper.from_array(stack(q2, "scales", fdt), "s2")]
    inputs = ["x", "logits", "fc1", "s1", "", "fc2", "s2", "", "", "", ""]
    if not symmetric:
        inits += [numpy_helper.from_array(stack(q1, "zero_points"), "z1"),
                  numpy_helper.from_array(stack(q2, "zero_points"), "z2")]
        inputs += ["z1", "z2"]
    node = helper.make_node(
        "QMoE", inputs, ["y"], domain="com.microsoft", k=K, activation_type="swiglu", swiglu_fusion=1,
        normalize_routing_weights=1, expert_weight_bits=bits, block_size=group, activation_alpha=1.0,
        activation_beta=0.0, weights_prepacked=0,
    )
    ttype = TensorProto.FLOAT16 if half else TensorProto.FLOAT
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", ttype, [T, H]), helper.make_tensor_value_info("logits", ttype, [T, E])],
        [helper.make_tensor_value_info("y", ttype, [T, H])], inits,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(helper.make_model(graph, opset_imports=opsets).SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    x = torch.randn(T, H, generator=gen).to(torch.float16).float()  # (T, H), representable in fp16
    logits = torch.randn(T, E, generator=gen).to(torch.float16).float()  # (T, E)
    y = sess.run(None, {"x": x.numpy().astype(fdt), "logits": logits.numpy().astype(fdt)})[0].astype(np.float32)
    w, idx = logits.softmax(-1).topk(K, -1)  # (T, K)
    w = w / w.sum(-1, keepdim=True)
    ref = torch.zeros(T, H)
    for q in q1 + q2:  # the kernel sees the scales in the activation dtype
        object.__setattr__(q, "scales", torch.from_numpy(q.scales.numpy().astype(fdt).astype(np.float32)))
    for t in range(T):
        for j in range(K):
            e = int(idx[t, j])
            h = x[t] @ dequantize(q1[e])[perm.argsort()].T  # (2I,) back in gate; up order
            ref[t] += w[t, j] * ((torch.nn.functional.silu(h[:INTER]) * h[INTER:]) @ dequantize(q2[e]).T)
    return float(np.abs(y - ref.numpy()).max()), float(ref.abs().max())


@pytest.mark.parametrize(("bits", "group", "symmetric", "half", "rel"), [
    (4, 16, True, False, 1e-5), (4, 32, False, False, 1e-5), (4, 64, True, False, 1e-5), (4, 64, False, False, 1e-5),
    (2, 16, True, False, 1e-5), (2, 16, False, False, 1e-5),
    (3, 32, True, True, 3e-3), (3, 64, True, True, 3e-3),  # fp16 activations
    (8, 32, True, False, 3e-2), (8, 64, False, False, 3e-2), (2, 64, False, False, 3e-2),  # int8 activations
])
def test_qmoe_reads_our_packed_experts(bits: int, group: int, symmetric: bool, half: bool, rel: float) -> None:
    diff, scale = _qmoe(bits, group, symmetric, half)
    assert diff <= rel * scale, (diff, scale)


def test_a_quantized_layer_runs_as_one_qmoe_node() -> None:
    """The quantize pass's packed experts of a whole tiny Mixtral layer, through QMoE, match the layer."""
    import moeopt
    from moeopt.passes import PassManager
    from moeopt.quant.ort_layout import bit_groups, matmul_nbits_inputs, qmoe_group
    from moeopt.testing import tiny_model

    model = moeopt.load(tiny_model("mixtral"))
    PassManager("quantize{method=uniform,bits=4,group=16}").run(model)  # H=32, I=48: QMoE needs block | both
    layer = model.layers[0]
    t = layer.table
    groups = bit_groups(t)
    assert list(groups) == [4]
    g = qmoe_group(t, groups[4])
    inits = [numpy_helper.from_array(a, n) for a, n in ((g.fc1, "fc1"), (g.fc1_scales, "s1"), (g.fc2, "fc2"),
                                                         (g.fc2_scales, "s2"), (g.fc1_zero_points, "z1"),
                                                         (g.fc2_zero_points, "z2"))]
    ins = ["x", "logits", "fc1", "s1", "", "fc2", "s2", "", "", "", "", "z1", "z2"]
    node = helper.make_node("QMoE", ins, ["y"], domain="com.microsoft", k=layer.router.top_k,
                            activation_type="swiglu", normalize_routing_weights=1, activation_alpha=1.0,
                            activation_beta=0.0, **g.attributes(glu=True))
    hid, n_exp, n_tok = t.spec.hidden, layer.router.num_experts, 10
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n_tok, hid]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, [n_tok, n_exp])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n_tok, hid])], inits,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    sess = ort.InferenceSession(helper.make_model(graph, opset_imports=opsets).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    x = torch.randn(1, n_tok, hid, generator=torch.Generator().manual_seed(3))  # (1, T, H)
    logits = x[0] @ layer.router_weight.T  # (T, E)
    with torch.no_grad():
        ref = layer(x)[0]  # (T, H): routed experts on the dequantized weights
    y = sess.run(None, {"x": x[0].numpy(), "logits": logits.numpy()})[0]
    assert np.abs(y - ref.numpy()).max() < 1e-5 * max(1.0, float(ref.abs().max()))
    b, scales, zp, attrs = matmul_nbits_inputs(t, 1, "w_out")
    assert b.shape == (hid, 3, 8) and scales.shape == (hid * 3,) and zp is not None and attrs["K"] == 48
