"""Offload mode inside the export: each MoE layer keeps its HOT slots and leaves its cold ones to the runtime.

While `offload_layers(hot)` is active, the translation of a layer (see `translate.moe_layer_onnx`)
lowers only the hot slots (QMoE / MoE with initializers, exactly as in resident mode) and emits two
marker nodes in the private domain ``moeopt.offload``:

- ``KeepMask(keep_mask)`` stands for the router's keep mask, which becomes graph input ``moe{i}.keep_mask``
  (the runtime feeds the model's mask, or SwapMoE's committee mask);
- ``Cold(x (N, H), sw (N, S), logits (N, E)) -> (N, H)`` stands for the cold experts' output: its inputs
  become graph outputs ``moe{i}.x / .sw / .logits`` and its output graph input ``moe{i}.cold``.

`expose_markers` turns the markers into those graph inputs/outputs after the export (onnx-ir), which
leaves an acyclic graph for `segments.partition`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import onnx_ir as ir
from onnx.defs import OpSchema
from onnxscript import values

from moeopt.errors import UnsupportedModelError
from moeopt.lower import onnx_quant
from moeopt.lower.onnx_experts import lowering_kind, op
from moeopt.lower.onnx_quant import Group, plan
from moeopt.lower.onnx_routing import Value

DOMAIN = "moeopt.offload"
OFFLOADABLE = ("com.microsoft.QMoE", "com.microsoft.MoE")

# MoE layer index -> its hot slots, while an offload export runs.
_HOT: contextvars.ContextVar[dict[int, tuple[int, ...]] | None] = contextvars.ContextVar("moeopt_hot", default=None)


def value_names(layer: int) -> dict[str, str]:
    """The graph value names of MoE layer `layer` in an offload graph."""
    return {k: f"moe{layer}.{k}" for k in ("x", "sw", "logits", "cold", "keep_mask")}


@contextlib.contextmanager
def offload_layers(hot: dict[int, tuple[int, ...]]) -> Iterator[None]:
    """Lower MoE layers in offload mode inside the block: `hot` maps a layer index to its hot slots."""
    token = _HOT.set(dict(hot))
    try:
        yield
    finally:
        _HOT.reset(token)


def active() -> bool:
    return _HOT.get() is not None


def _schema(name: str, inputs: list[tuple[str, str]], types: list[tuple[str, list[str]]]) -> OpSchema:
    fp = OpSchema.FormalParameter
    return OpSchema(name, DOMAIN, 1, doc="", inputs=[fp(n, t) for n, t in inputs], outputs=[fp("y", inputs[0][1])],
                    type_constraints=[(t, allowed, "") for t, allowed in types],
                    attributes=[OpSchema.Attribute("layer", OpSchema.AttrType.INT, "")])


_OPSET = values.Opset(DOMAIN, 1)
_KEEP = values.Op(_OPSET, "KeepMask", _schema("KeepMask", [("mask", "B")], [("B", ["tensor(bool)"])]))
_COLD = values.Op(_OPSET, "Cold", _schema("Cold", [("x", "T"), ("sw", "T"), ("logits", "T")],
                                         [("T", ["tensor(float)"])]))


def cold_groups(layer: Any, hot: Sequence[int]) -> list[Group]:
    """The storage groups of `layer` restricted to its cold slots (empty groups dropped).

    Raises:
        UnsupportedModelError: a cold slot sits in a group that lowers to MatMulNBits or plain ops.
    """
    groups = plan(layer) if len(layer.table.quantized) else [Group(tuple(range(layer.table.num_slots)), None,
                                                                   lowering_kind(layer))]
    out = []
    for g in groups:
        cold = tuple(s for s in g.slots if s not in hot)
        if not cold:
            continue
        if g.op not in OFFLOADABLE:
            why = f" ({g.why})" if g.why else ""
            raise UnsupportedModelError(
                f"layer {layer.index}: slots {list(cold)} lower to {g.op}{why}, which cannot be offloaded; "
                "make them hot (lower{hot=...}) or lower with experts=resident")
        out.append(replace(g, slots=cold))
    return out


def check_offloadable(layers: Sequence[Any], hot: dict[int, tuple[int, ...]]) -> None:
    """Fail before the export on layers whose cold slots cannot go to the expert file."""
    for layer in layers:
        cold_groups(layer, hot[layer.index])


def keep_mask_input(keep_mask: Value, layer: Any) -> Value:
    """The router's keep mask: a marker that `expose_markers` turns into graph input moe{i}.keep_mask."""
    if layer is None or not active():
        return keep_mask
    return _KEEP(keep_mask, layer=int(layer.index))


def split_experts(x2: Value, sw: Value, logits: Value, layer: Any) -> Value:
    """Hot slots lowered as in resident mode, plus the cold marker: (N, H)."""
    hot = (_HOT.get() or {}).get(int(layer.index), ())
    settings = onnx_quant._SETTINGS.get() or onnx_quant.QuantSettings()
    cold = _COLD(x2, sw, logits, layer=int(layer.index))
    groups = plan(layer) if len(layer.table.quantized) else [Group(tuple(range(layer.table.num_slots)), None,
                                                                   lowering_kind(layer))]
    out = cold
    for g in groups:
        slots = tuple(s for s in g.slots if s in hot)
        if not slots:
            continue
        g = replace(g, slots=slots)
        if g.op == "com.microsoft.QMoE":
            y = onnx_quant._qmoe(x2, sw, layer, g, settings)
        elif g.op == "com.microsoft.MatMulNBits":
            y = onnx_quant._matmul_nbits(x2, sw, layer, g, settings)
        else:  # float slots: MoE node or plain ops, over the hot slots only
            y = onnx_quant._float_group(x2, sw, layer, g)
        out = op.Add(out, y)
    return out


def expose_markers(graph: ir.Graph) -> list[int]:
    """Replace the marker nodes by graph inputs/outputs named by `value_names`; returns the MoE layers seen."""
    layers = []
    for node in list(graph):
        if node.domain != DOMAIN:
            continue
        i = node.attributes["layer"].as_int()
        names = value_names(i)
        out = node.outputs[0]
        if node.op_type == "KeepMask":
            new = ir.Value(name=names["keep_mask"], type=ir.TensorType(ir.DataType.BOOL),
                           shape=node.inputs[0].shape if node.inputs[0] is not None else None)
        else:
            layers.append(i)
            for value, key in zip(node.inputs, ("x", "sw", "logits"), strict=True):
                assert value is not None
                if value in graph.outputs or value.is_graph_input() or value.is_initializer():
                    value = _identity(graph, node, value, names[key])
                else:
                    value.name = names[key]
                graph.outputs.append(value)
            new = ir.Value(name=names["cold"], type=ir.TensorType(ir.DataType.FLOAT), shape=out.shape)
        graph.inputs.append(new)
        ir.convenience.replace_all_uses_with(out, new)
        graph.remove(node, safe=True)
    graph.opset_imports.pop(DOMAIN, None)
    return sorted(layers)


def _identity(graph: ir.Graph, before: ir.Node, value: ir.Value, name: str) -> ir.Value:
    """An Identity of `value` named `name` (a value cannot be a graph output under two names)."""
    node = ir.node("Identity", [value], name=f"{name}/identity")
    node.outputs[0].name = name
    node.outputs[0].shape, node.outputs[0].type = value.shape, value.type
    graph.insert_before(before, node)
    return node.outputs[0]
