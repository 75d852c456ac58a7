"""ONNX translation of the `moeopt::moe_layer` op, for torch.onnx.export's custom_translation_table.

The op's static `config` attribute (router / expert / shared specs) decides which ONNX ops are emitted,
so one Python function serves every architecture: routing as standard ops, the experts as one
`com.microsoft.MoE` node where that is exact, plain ops otherwise.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from onnxscript import BOOL, FLOAT, INT64, opset18

from moeopt.ir.compute import shared_tensor_names
from moeopt.ir.layer import MoELayer
from moeopt.ir.ops import parse_config
from moeopt.lower import offload_graph, onnx_experts, onnx_quant, onnx_routing
from moeopt.lower.onnx_routing import const_i

op: Any = opset18  # untyped on purpose: onnxscript's per-op stubs do not fit traced values

# Layers by the name their w_in parameter gets in the exported graph, so a translation can reach the
# layer's ExpertTable (the quantized lowering needs the packed weights, which are not op inputs).
_LAYERS: contextvars.ContextVar[dict[str, MoELayer] | None] = contextvars.ContextVar("moeopt_layers", default=None)
STATS: dict[str, int] = {"moe-nodes": 0, "dense-layers": 0}


@contextlib.contextmanager
def layers_by_name(layers: dict[str, MoELayer]) -> Iterator[None]:
    """Make the model's layers visible to the translation (keys: w_in names as in the exported graph)."""
    token = _LAYERS.set(layers)
    try:
        yield
    finally:
        _LAYERS.reset(token)


def _find_layer(w_in: Any) -> MoELayer | None:
    name = str(getattr(w_in, "name", "") or "")
    table = _LAYERS.get() or {}
    return table.get(name) or table.get(name.replace("_", ".")) or next(
        (layer for key, layer in table.items() if name.endswith(key.replace(".", "_"))), None
    )


def moe_layer_onnx(
    x: FLOAT,
    router_w: FLOAT,
    router_b: FLOAT | None,
    score_bias: FLOAT | None,
    keep_mask: BOOL,
    slot_of: INT64,
    w_in: FLOAT,
    w_out: FLOAT,
    b_in: FLOAT | None,
    b_out: FLOAT | None,
    shared: Sequence[FLOAT],
    config: str,
) -> FLOAT:
    """(B, T, H) -> (B, T, H): the whole canonical MoE layer (see `moeopt.ir.compute.moe_compute`)."""
    router, experts, shared_specs = parse_config(config)
    x2 = op.Reshape(x, const_i(-1, experts.hidden))  # (N, H)
    logits = op.MatMul(x2, op.Transpose(router_w, perm=[1, 0]))  # (N, E)
    if router_b is not None:
        logits = op.Add(logits, router_b)
    layer = _find_layer(w_in)
    offload = offload_graph.active() and layer is not None  # cold slots go to the runtime (offload mode)
    if offload:
        keep_mask = offload_graph.keep_mask_input(keep_mask, layer)
    if not offload and layer is not None and not onnx_quant.kernel_routing(layer):
        # one QMoE node routes from the logits itself: the canonical router below is the same function
        out = onnx_quant.qmoe_from_logits(x2, logits, layer)
    else:
        weights, index = onnx_routing.route(logits, router, keep_mask, score_bias)
        batch = op.Slice(op.Shape(x), const_i(0), const_i(1))
        weights = onnx_routing.apply_capacity(weights, index, batch, router)
        num_slots = _static_dim(w_in, 0)
        sw = onnx_routing.slot_weights(weights, index, slot_of, num_slots)  # (N, S)
        if offload:
            out = offload_graph.split_experts(x2, sw, logits, layer)
        else:
            out = onnx_experts.routed_experts(
                x2, sw, w_in, w_out, b_in, b_out, experts, router.top_k, num_slots, layer
            )
        if layer is None or not len(layer.table.quantized):  # quantized layers are counted by onnx_quant (QMoE ...)
            STATS["moe-nodes" if onnx_experts.uses_moe_op(experts, router.top_k, num_slots) else "dense-layers"] += 1
    pos = 0
    for spec in shared_specs:
        n = len(shared_tensor_names(spec))
        out = op.Add(out, onnx_experts.shared_expert(x2, shared[pos : pos + n], spec))
        pos += n
    return op.Reshape(out, op.Shape(x))


def _static_dim(v: Any, axis: int) -> int:
    shape = getattr(v, "shape", None)
    if shape is None or not isinstance(shape[axis], int):
        raise ValueError(f"the number of expert slots must be static, got shape {shape}")
    return int(shape[axis])


def translation_table() -> dict[Any, Any]:
    """custom_translation_table for torch.onnx.export."""
    return {torch.ops.moeopt.moe_layer.default: moe_layer_onnx}
