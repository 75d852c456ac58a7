"""The routed and shared experts of one layer as ONNX: ORT's `com.microsoft.MoE` where it is exact,
plain ONNX ops (every slot computed densely, weighted, summed) where it is not.

The router is computed outside the MoE node (see `onnx_routing`), so whatever moeopt's routing does,
the node only has to apply given per-slot weights `sw` (N, S). `MoE` takes router LOGITS and applies a
softmax, then a top-k over slots: feeding `log(sw)` (about -69 where a slot is not chosen) makes the
softmax return `sw / sum(sw)` on the chosen slots and ~0 elsewhere, and multiplying the node's output by
`sum(sw)` (the output is linear in the weights) gives back exactly the weighted sum. At most `top_k`
slots carry weight per token (merged experts only ever reduce the count), so k = min(top_k, S) never
drops a chosen slot.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from onnx.defs import OpSchema
from onnxscript import opset18, values

from moeopt.errors import UnsupportedModelError
from moeopt.ir.spec import ExpertSpec, SharedSpec
from moeopt.lower.onnx_routing import Value, const_i

op: Any = opset18  # untyped on purpose: onnxscript's per-op stubs do not fit traced values

# ORT's CPU MoE kernel runs these for MLP (non-GLU) experts; GLU experts only as SiLU-gated "swiglu".
MOE_MLP_ACTS = {"relu": "relu", "silu": "silu", "swish": "silu"}
MOE_GLU_ACTS = ("silu", "swish")
MOE_MAX_K = 8  # the CPU kernel's top-k limit

QuantizedLowering = Callable[[Value, Value, Any, int], Value]
"""Hook for layers whose ExpertTable has `quantized` entries (packed MatMulNBits-layout weights).

Called as fn(x2 (N, H), sw (N, S) per-slot weights, layer: MoELayer, top_k) inside the exporter's
tracing and returns the routed experts' output (N, H). The intended lowering (ONNX-NOTES.md): one
`com.microsoft.QMoE` node per bitwidth group (`moeopt.quant.ort_layout.qmoe_group`), each fed
`weighted_router(Gather(sw, group_slots, axis=1))` and its output scaled back, outputs added; packed
weights enter as `op.Constant(value=ir.tensor(array))` (lifted to initializers by the exporter).
Register with `QUANTIZED_LOWERING.append(fn)`; the last one registered is used. `moeopt.lower.onnx_quant`
implements it and registers itself when `moeopt.lower` is imported.
"""
QUANTIZED_LOWERING: list[QuantizedLowering] = []


def _moe_schema() -> OpSchema:
    """The contrib op's schema as far as the exporter needs it (onnx's registry does not know it)."""
    fp, opt = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    attr, at = OpSchema.Attribute, OpSchema.AttrType
    inputs = [
        fp("input", "T"), fp("router_probs", "T"), fp("fc1_experts_weights", "T"),
        fp("fc1_experts_bias", "T", param_option=opt), fp("fc2_experts_weights", "T"),
        fp("fc2_experts_bias", "T", param_option=opt),
    ]
    attrs = [attr("k", at.INT, ""), attr("activation_type", at.STRING, ""),
             attr("normalize_routing_weights", at.INT, ""), attr("swiglu_fusion", at.INT, ""),
             attr("activation_alpha", at.FLOAT, ""), attr("activation_beta", at.FLOAT, ""),
             attr("swiglu_limit", at.FLOAT, "")]
    return OpSchema(
        "MoE", "com.microsoft", 1, doc="", inputs=inputs, outputs=[fp("output", "T")],
        type_constraints=[("T", ["tensor(float)"], "")], attributes=attrs,
    )


MSFT_DOMAIN = "com.microsoft"
_MOE = values.Op(values.Opset(MSFT_DOMAIN, 1), "MoE", _moe_schema())


def uses_moe_op(spec: ExpertSpec, top_k: int, num_slots: int) -> bool:
    """Whether ORT's MoE kernel computes these experts exactly (else plain ops are emitted).

    Its swiglu takes expert biases and gpt-oss's clamped form (activation_alpha / activation_beta /
    swiglu_limit), measured exact on ORT 1.32's CPU kernel (tests/test_gpt_oss.py).
    """
    if (spec.bias and not spec.glu) or min(top_k, num_slots) > MOE_MAX_K:
        return False
    return spec.act in MOE_GLU_ACTS if spec.glu else spec.act in MOE_MLP_ACTS


def lowering_kind(layer: Any) -> str:
    """How a MoELayer's routed experts are lowered: com.microsoft.MoE, onnx-ops, or quantized."""
    t = layer.table
    if len(t.quantized):
        return "quantized"
    return "com.microsoft.MoE" if uses_moe_op(t.spec, layer.router.top_k, t.num_slots) else "onnx-ops"


def _interleave_gate_up(w_in: Value, spec: ExpertSpec) -> Value:
    """(S, 2I, H) [gate rows; up rows] -> (S, 2I, H) rows g0, u0, g1, u1 ... (swiglu_fusion=1)."""
    i, h = spec.intermediate, spec.hidden
    w = op.Reshape(w_in, const_i(-1, 2, i, h))
    return op.Reshape(op.Transpose(w, perm=[0, 2, 1, 3]), const_i(-1, 2 * i, h))


def _interleave_bias(b_in: Value, spec: ExpertSpec) -> Value:
    """(S, 2I) [gate; up] -> (S, 2I) g0, u0, g1, u1 ... as `_interleave_gate_up` orders the rows."""
    i = spec.intermediate
    return op.Reshape(op.Transpose(op.Reshape(b_in, const_i(-1, 2, i)), perm=[0, 2, 1]), const_i(-1, 2 * i))


def swiglu_attrs(spec: ExpertSpec) -> dict[str, float]:
    """MoE/QMoE attributes of a clamped SwiGLU (gpt-oss); empty for the plain one (the kernels' default)."""
    if not spec.clamped_swiglu:
        return {}
    out = {"activation_alpha": spec.swiglu_alpha, "activation_beta": spec.swiglu_beta}
    if spec.swiglu_limit is not None:
        out["swiglu_limit"] = spec.swiglu_limit
    return out


def weighted_router(sw: Value) -> tuple[Value, Value]:
    """(router logits, scale) that make a softmax-routing MoE/QMoE node apply the weights `sw` (N, S).

    softmax(log sw) = sw / sum(sw) on the chosen slots; the node's output times `scale` = sum(sw) (N, 1)
    is then the sw-weighted sum, since the output is linear in them. Zeros become 1e-30 rather than
    log 0 = -inf: a row with no weight at all (every choice dropped) would otherwise softmax to NaN; a
    floored slot gets a relative weight ~1e-30, below float32 resolution next to any real weight, and
    an all-zero row is multiplied by scale 0.
    """
    floor = op.Constant(value_float=1e-30)
    return op.Log(op.Max(sw, floor)), op.ReduceSum(sw, const_i(-1), keepdims=1)


def moe_node(
    x2: Value, sw: Value, w_in: Value, w_out: Value, spec: ExpertSpec, k: int, b_in: Value | None = None,
    b_out: Value | None = None,
) -> Value:
    """Weighted experts through one `com.microsoft.MoE` node: (N, H), (N, S) -> (N, H)."""
    fc1 = _interleave_gate_up(w_in, spec) if spec.glu else w_in
    b1 = _interleave_bias(b_in, spec) if spec.glu and b_in is not None else b_in
    return moe_call(x2, sw, fc1, w_out, spec, k, b1, b_out)


def moe_call(
    x2: Value, sw: Value, fc1: Value, w_out: Value, spec: ExpertSpec, k: int, b1: Value | None = None,
    b2: Value | None = None,
) -> Value:
    """`moe_node` with fc1 (and its bias b1) already in the kernel's layout (GLU gate/up rows interleaved)."""
    act = "swiglu" if spec.glu else MOE_MLP_ACTS[spec.act]
    logits, scale = weighted_router(sw)
    y = _MOE(
        x2, logits, fc1, b1, w_out, b2,
        k=k, activation_type=act, normalize_routing_weights=0, swiglu_fusion=1 if spec.glu else 0,
        **swiglu_attrs(spec),
    )
    return op.Mul(y, scale)


def activation(x: Value, act: str) -> Value:
    """transformers' ACT2FN[act] as ONNX ops (the ones MoE models use)."""
    if act in ("silu", "swish"):
        return op.Mul(x, op.Sigmoid(x))
    if act == "relu":
        return op.Relu(x)
    if act == "gelu":  # exact (erf) GELU, as torch's default
        return op.Mul(op.Mul(x, op.Constant(value_float=0.5)),
                      op.Add(op.Erf(op.Div(x, op.Constant(value_float=2**0.5))), op.Constant(value_float=1.0)))
    if act in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        c = op.Constant(value_float=(2 / 3.141592653589793) ** 0.5)
        inner = op.Mul(c, op.Add(x, op.Mul(op.Constant(value_float=0.044715), op.Pow(x, op.Constant(value_float=3.0)))))
        return op.Mul(op.Mul(x, op.Constant(value_float=0.5)), op.Add(op.Tanh(inner), op.Constant(value_float=1.0)))
    raise UnsupportedModelError(f"activation '{act}' has no ONNX lowering yet")


def glu_product(gate: Value, up: Value, spec: ExpertSpec | SharedSpec) -> Value:
    """act(gate) * up, or the clamped SwiGLU (see ExpertSpec), as plain ONNX ops."""
    if not spec.clamped_swiglu:
        return op.Mul(activation(gate, spec.act), up)
    lim = spec.swiglu_limit
    if lim is not None:
        gate = op.Min(gate, op.Constant(value_float=lim))
        up = op.Clip(up, op.Constant(value_float=-lim), op.Constant(value_float=lim))
    glu = op.Mul(gate, op.Sigmoid(op.Mul(gate, op.Constant(value_float=spec.swiglu_alpha))))
    return op.Mul(op.Add(up, op.Constant(value_float=spec.swiglu_beta)), glu)


def dense_experts(
    x2: Value, sw: Value, w_in: Value, w_out: Value, b_in: Value | None, b_out: Value | None, spec: ExpertSpec,
) -> Value:
    """Every slot on every token, weighted by `sw` (0 where not chosen), summed: exact for any expert."""
    h = op.MatMul(x2, op.Transpose(w_in, perm=[0, 2, 1]))  # (S, N, F)
    if b_in is not None:
        h = op.Add(h, op.Unsqueeze(b_in, const_i(1)))
    if spec.glu:
        gate, up = op.Split(h, num_outputs=2, axis=-1)
        h = glu_product(gate, up, spec)
    else:
        h = activation(h, spec.act)
    y = op.MatMul(h, op.Transpose(w_out, perm=[0, 2, 1]))  # (S, N, H)
    if b_out is not None:
        y = op.Add(y, op.Unsqueeze(b_out, const_i(1)))
    y = op.Mul(y, op.Unsqueeze(op.Transpose(sw, perm=[1, 0]), const_i(-1)))  # (S, N, 1) weights
    return op.ReduceSum(y, const_i(0), keepdims=0)


def _linear(x: Value, w: Value, b: Value | None) -> Value:
    y = op.MatMul(x, op.Transpose(w, perm=[1, 0]))
    return y if b is None else op.Add(y, b)


def shared_expert(x2: Value, tensors: Sequence[Value], spec: SharedSpec) -> Value:
    """A dense shared expert from its flat tensor list (order of `moeopt.ir.compute.shared_tensor_names`)."""
    it = iter(tensors)
    if spec.glu:
        wg, wu = next(it), next(it)
        bg, bu = (next(it), next(it)) if spec.bias else (None, None)
        h = glu_product(_linear(x2, wg, bg), _linear(x2, wu, bu), spec)
    else:
        wi = next(it)
        bi = next(it) if spec.bias else None
        h = activation(_linear(x2, wi, bi), spec.act)
    wd = next(it)
    bd = next(it) if spec.bias else None
    y = _linear(h, wd, bd)
    if spec.gated:
        y = op.Mul(op.Sigmoid(_linear(x2, next(it), None)), y)
    return y


def check_lowerable(layers: Sequence[Any]) -> None:
    """Fail before the export (whose wrapping would bury the message) on layers nothing can lower."""
    for layer in layers:
        if len(layer.table.quantized) and not QUANTIZED_LOWERING:
            raise UnsupportedModelError(
                f"layer {layer.index} has quantized experts and no quantized lowering (QMoE / MatMulNBits) is "
                "registered yet; lower the model before the quantize pass"
            )


def routed_experts(
    x2: Value, sw: Value, w_in: Value, w_out: Value, b_in: Value | None, b_out: Value | None,
    spec: ExpertSpec, top_k: int, num_slots: int, layer: Any = None,
) -> Value:
    """Pick the lowering of one layer's routed experts: quantized hook, MoE node, or plain ops."""
    if layer is not None and len(layer.table.quantized):
        if not QUANTIZED_LOWERING:
            raise UnsupportedModelError(
                f"layer {layer.index} has quantized experts; their lowering (QMoE / MatMulNBits) is not available"
            )
        return QUANTIZED_LOWERING[-1](x2, sw, layer, top_k)
    if uses_moe_op(spec, top_k, num_slots):
        return moe_node(x2, sw, w_in, w_out, spec, min(top_k, num_slots), b_in, b_out)
    return dense_experts(x2, sw, w_in, w_out, b_in, b_out, spec)
