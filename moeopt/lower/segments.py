"""Cut an offload graph into segments the runtime runs in sequence, with its cold experts in between.

Layer i's cold experts can only be computed once the runtime has seen layer i's routing, so the graph
(see `offload_graph.expose_markers`) becomes segments seg0..segL: segment k < L ends at
``moe{k}.x / .sw / .logits``; segment k > 0 starts from ``moe{k-1}.cold``; segment L ends at the logits.

Each node goes to the earliest segment that has all it needs: a node downstream of ``moe{i}.cold`` is in
segment >= i + 1. Nodes that need no cold output at all ("free": embeddings, masks, rotary tables, prefetch
hints) go to the earliest segment that uses them, so nothing is computed twice. A value made in one
segment and used by a later one becomes an output of the first and an input of the later one (same
name); graph inputs and initializers are given to every segment that reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir

from moeopt.lower.offload_graph import value_names


@dataclass(frozen=True)
class Segment:
    """One segment as the manifest records it."""

    file: str
    inputs: list[str]
    outputs: list[str]

    def to_dict(self) -> dict[str, object]:
        return {"file": self.file, "inputs": self.inputs, "outputs": self.outputs}


def _assign(graph: ir.Graph, num_layers: int) -> dict[ir.Node, int]:
    """Segment of every node that some graph output needs."""
    cold_stage = {value_names(i)["cold"]: i + 1 for i in range(num_layers)}
    stage: dict[ir.Value, int] = {v: cold_stage[v.name] for v in graph.inputs if v.name in cold_stage}
    nodes = list(graph)
    seg: dict[ir.Node, int] = {}
    # A layer's cut values belong to its segment, so its hot experts (which read them) run there too.
    cut = {value_names(i)[k]: i for i in range(num_layers) for k in ("x", "sw", "logits")}
    for node in nodes:  # forward: nodes downstream of a cold input (topological order)
        s = [stage[v] for v in node.inputs if v is not None and v in stage]
        if s:
            seg[node] = max(s)
            for out in node.outputs:
                stage[out] = seg[node]
        for out in node.outputs:
            if out.name in cut:
                stage[out] = max(stage.get(out, 0), cut[out.name])
    last = num_layers
    for node in reversed(nodes):  # backward: free nodes go to their earliest consumer
        if node in seg:
            continue
        users = [seg[u] for out in node.outputs for u, _ in out.uses() if u in seg]
        if any(out in graph.outputs for out in node.outputs):
            users.append(0)
        if users:
            seg[node] = min(users)
    for out in graph.outputs:  # the cut points must land where the driver expects them
        p = out.producer()
        if out.name and out.name.startswith("moe") and out.name.split(".")[-1] in ("x", "sw", "logits"):
            want = int(out.name[3:].split(".")[0])
            if p is None or seg.get(p) != want:
                raise RuntimeError(f"offload segments: {out.name} lands in segment {seg.get(p) if p else None}, "
                                   f"expected {want}")
    assert all(v <= last for v in seg.values())
    return seg


_BOOL_OPS = {"Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf"}
_INT64_OPS = {"Shape", "Size", "ArgMax", "ArgMin", "NonZero"}
_FROM_INPUT = {"Where": 1, "ScatterElements": 2, "ScatterND": 2}  # output type = this input's


def _type(v: ir.Value, depth: int = 0) -> ir.TypeProtocol | None:
    """`v`'s type, derived from its producer where the exporter left it unset (it cannot infer contrib ops
    such as MoE/QMoE, nor what depends on them). A graph input needs one."""
    if v.type is not None or depth > 256:
        return v.type
    p = v.producer()
    if p is None:
        return None
    dtype: ir.DataType | None = None
    if p.op_type in _BOOL_OPS and p.domain in ("", "ai.onnx"):
        dtype = ir.DataType.BOOL
    elif p.op_type in _INT64_OPS or (p.op_type == "TopK" and v is p.outputs[1]):
        dtype = ir.DataType.INT64
    elif p.op_type == "Cast":
        dtype = ir.DataType(p.attributes["to"].as_int())
    elif p.op_type == "ConstantOfShape":
        attr = p.attributes.get("value")
        dtype = attr.as_tensor().dtype if attr is not None else ir.DataType.FLOAT
    else:
        first = _FROM_INPUT.get(p.op_type, 0)
        order = [first, *range(len(p.inputs))]
        for i in order:
            src = p.inputs[i] if i < len(p.inputs) else None
            t = None if src is None else _type(src, depth + 1)
            if t is not None:
                return t
        return None
    return ir.TensorType(dtype)


def _fresh(v: ir.Value) -> ir.Value:
    return ir.Value(name=v.name, type=_type(v), shape=v.shape)


def partition(model: ir.Model, num_layers: int, folder: Path, prefix: str = "seg") -> list[Segment]:
    """Split `model` (consumed) into num_layers + 1 segment files under `folder`, each with external data."""
    graph = model.graph
    seg = _assign(graph, num_layers)
    n_seg = num_layers + 1
    members: list[list[ir.Node]] = [[] for _ in range(n_seg)]
    for node in graph:
        if node in seg:
            members[seg[node]].append(node)
    graph_inputs, graph_outputs = list(graph.inputs), list(graph.outputs)
    inits = dict(graph.initializers)
    seg_inputs: list[dict[str, ir.Value]] = [{} for _ in range(n_seg)]
    seg_inits: list[dict[str, ir.Value]] = [{} for _ in range(n_seg)]
    seg_outputs: list[list[ir.Value]] = [[] for _ in range(n_seg)]
    produced = {out: seg[n] for n in seg for out in n.outputs}
    for k in range(n_seg):
        for node in members[k]:
            for idx, v in enumerate(node.inputs):
                if v is None or produced.get(v) == k:
                    continue
                name = v.name or ""
                if v.is_initializer() or (name in inits and inits[name] is v):
                    new = seg_inits[k].get(name)
                    if new is None:
                        new = ir.Value(name=name, type=v.type, shape=v.shape, const_value=v.const_value)
                        seg_inits[k][name] = new
                else:
                    if v not in graph_inputs:
                        src = produced[v]
                        assert src < k, f"{name}: made in segment {src}, used in {k}"
                        if v not in seg_outputs[src]:
                            seg_outputs[src].append(v)
                    new = seg_inputs[k].get(name) or _fresh(v)
                    seg_inputs[k][name] = new
                node.replace_input_with(idx, new)
    for v in graph_outputs:
        k = produced.get(v, 0)
        if v not in seg_outputs[k]:
            seg_outputs[k].append(v)
    for outs in seg_outputs:
        for v in outs:
            if v.type is None:
                v.type = _type(v)
    graph.inputs.clear()
    graph.outputs.clear()
    graph.initializers.clear()
    graph.remove(list(graph), safe=False)
    out = []
    for k in range(n_seg):
        order = {v.name: i for i, v in enumerate(graph_inputs)}
        ins = sorted(seg_inputs[k].values(), key=lambda v: (order.get(v.name, len(order)), v.name or ""))
        g = ir.Graph(ins, seg_outputs[k], nodes=members[k], initializers=list(seg_inits[k].values()),
                     opset_imports=dict(graph.opset_imports), name=f"{prefix}{k}")
        m = ir.Model(g, ir_version=model.ir_version, producer_name=model.producer_name,
                     producer_version=model.producer_version)
        name = f"{prefix}{k}.onnx"
        (folder / (name + ".data")).unlink(missing_ok=True)  # a save would append to a stale file
        ir.save(m, folder / name, external_data=name + ".data")
        out.append(Segment(name, [v.name or "" for v in ins], [v.name or "" for v in seg_outputs[k]]))
    return out
