"""onnx-ir clean-ups applied to the exported graph before it is saved.

- `fold_weight_layout`: Transpose / Reshape chains on a weight (router transposes, the MoE node's
  gate/up interleave) are computed once here, so the saved weights are in the layout the kernels read
  and a session does not constant-fold (and briefly hold two copies of) every expert at load.
- `name_dynamic_dims`: readable names (batch, sequence, past_sequence ...) for the symbolic dims.
- `fuse_qkv`: the q, k, v projections feeding a GroupQueryAttention node become one MatMulNBits (or
  MatMul) with their weights stacked, read by the node as packed QKV.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

_LAYOUT_OPS = ("Transpose", "Reshape")


def _const(v: ir.Value | None) -> np.ndarray | None:
    if v is None:
        return None
    t = ir.convenience.get_const_tensor(v)
    return None if t is None else t.numpy()


def fold_weight_layout(model: ir.Model) -> int:
    """Fold Transpose/Reshape of initializers used only by that node; returns how many were folded.

    A weight read by several nodes (tied embeddings) is left alone: folding would store it twice.
    """
    graph = model.graph
    folded = 0
    changed = True
    while changed:
        changed = False
        for node in list(graph):
            if node.op_type not in _LAYOUT_OPS or node.domain not in ("", "ai.onnx"):
                continue
            src = node.inputs[0]
            if src is None or src.name is None or src.name not in graph.initializers or len(src.uses()) != 1:
                continue
            data = _const(src)
            if data is None:
                continue
            if node.op_type == "Transpose":
                perm = node.attributes.get("perm")
                result = np.transpose(data, perm.as_ints() if perm is not None else None)
            else:
                shape = _const(node.inputs[1])
                allowzero = node.attributes.get("allowzero")
                if shape is None or (allowzero is not None and allowzero.as_int()):
                    continue
                target = [data.shape[i] if d == 0 else int(d) for i, d in enumerate(shape.tolist())]
                result = data.reshape(target)
            base = src.name.removesuffix(".layout")
            new = ir.Value(name=f"{base}.layout", const_value=ir.tensor(np.ascontiguousarray(result)))
            new.shape = ir.Shape(result.shape)
            if src.dtype is not None:
                new.dtype = src.dtype
            out = node.outputs[0]
            if out in graph.outputs:
                continue
            del graph.initializers[src.name]  # first: a chain's next step reuses the ".layout" name
            graph.register_initializer(new)
            ir.convenience.replace_all_uses_with(out, new)
            graph.remove(node, safe=True)  # also drops the node's uses of its inputs
            folded += 1
            changed = True
    # Shape constants of folded Reshapes are initializers nothing reads any more.
    _drop_unused_initializers(graph)
    return folded


def name_dynamic_dims(model: ir.Model, names: dict[str, dict[int, str]]) -> None:
    """Rename the symbolic dims of graph inputs/outputs: {value name: {axis: dim name}}.

    Every occurrence of the old symbol (in any input or output) gets the new name, so dims that the
    exporter proved equal stay equal; derived dims (`s1 + s2`) are rewritten textually.
    """
    rename: dict[str, str] = {}
    for v in [*model.graph.inputs, *model.graph.outputs]:
        for axis, new in names.get(v.name or "", {}).items():
            dim = v.shape[axis] if v.shape is not None else None
            if isinstance(dim, ir.SymbolicDim) and dim.value is not None:
                rename.setdefault(dim.value, new)
    if not rename:
        return
    for v in [*model.graph.inputs, *model.graph.outputs]:
        if v.shape is None:
            continue
        dims: list[int | ir.SymbolicDim] = []
        for d in v.shape:
            if isinstance(d, ir.SymbolicDim) and d.value is not None:
                text = d.value
                for old in sorted(rename, key=len, reverse=True):
                    text = _replace_token(text, old, rename[old])
                dims.append(ir.SymbolicDim(text))
            else:
                dims.append(d)
        v.shape = ir.Shape(dims)


def _replace_token(text: str, old: str, new: str) -> str:
    import re

    return re.sub(rf"\b{re.escape(old)}\b", new, text)


def _single_use(v: ir.Value | None) -> bool:
    return v is not None and len(v.uses()) == 1


def _scalar(v: ir.Value | None) -> float | None:
    data = _const(v)
    return float(data.reshape(-1)[0]) if data is not None and data.size == 1 else None


def fuse_rms_norm(model: ir.Model) -> int:
    """RMSNorm as exported (Pow 2 -> ReduceMean last axis -> Add eps -> Sqrt -> Reciprocal -> Mul x -> Mul
    weight) becomes one SimplifiedLayerNormalization node (ORT's kernel; its optimizer does not match the
    Reciprocal form). Exact up to fp32 rounding; returns how many were fused.

    Why here and not in ORT: the kernel then also lets ORT's SkipLayerNormFusion turn the residual Add in
    front of it into SkipSimplifiedLayerNormalization at session start.
    """
    graph = model.graph
    fused = 0
    for node in list(graph):
        if node.op_type != "Pow" or node.domain not in ("", "ai.onnx") or _scalar(node.inputs[1]) != 2.0:
            continue
        x = node.inputs[0]
        chain = [node]
        ok = True
        for want in ("ReduceMean", "Add", "Sqrt", "Reciprocal"):
            out = chain[-1].outputs[0]
            if not _single_use(out):
                ok = False
                break
            nxt = next(iter(out.uses())).node
            if nxt.op_type != want:
                ok = False
                break
            chain.append(nxt)
        if not ok:
            continue
        mean, add = chain[1], chain[2]
        axes = _const(mean.inputs[1]) if len(mean.inputs) > 1 else None
        keep = mean.attributes.get("keepdims")
        if axes is None or axes.reshape(-1).tolist() != [-1] or (keep is not None and not keep.as_int()):
            continue
        eps = _scalar(add.inputs[1] if add.inputs[0] is chain[1].outputs[0] else add.inputs[0])
        recip = chain[-1].outputs[0]
        if eps is None or not _single_use(recip):
            continue
        mul_x = next(iter(recip.uses())).node
        if mul_x.op_type != "Mul" or x not in mul_x.inputs or not _single_use(mul_x.outputs[0]):
            continue
        mul_w = next(iter(mul_x.outputs[0].uses())).node
        if mul_w.op_type != "Mul":
            continue
        w = mul_w.inputs[1] if mul_w.inputs[0] is mul_x.outputs[0] else mul_w.inputs[0]
        wdata = _const(w)
        if w is None or wdata is None or wdata.ndim != 1 or x is None or x.shape is None or \
                x.shape[-1] != wdata.shape[0]:
            continue
        out = mul_w.outputs[0]
        if out in graph.outputs:
            continue
        norm = ir.node("SimplifiedLayerNormalization", [x, w], attributes={"axis": -1, "epsilon": eps,
                       "stash_type": 1}, num_outputs=1)
        _like(norm.outputs[0], out)
        graph.insert_before(node, norm)
        ir.convenience.replace_all_uses_with(out, norm.outputs[0])
        name = out.name
        for n in reversed([*chain, mul_x, mul_w]):
            graph.remove(n, safe=True)
        norm.outputs[0].name = name
        fused += 1
    fused += _fuse_skip(graph)
    _drop_unused_initializers(graph)
    return fused


def _fuse_skip(graph: ir.Graph) -> int:
    """Add(a, b) -> SimplifiedLayerNormalization becomes com.microsoft.SkipSimplifiedLayerNormalization,
    whose 4th output (a + b) feeds the Add's other readers (the residual stream)."""
    fused = 0
    for norm in list(graph):
        if norm.op_type != "SimplifiedLayerNormalization" or norm.domain not in ("", "ai.onnx"):
            continue
        add = norm.inputs[0].producer() if norm.inputs[0] is not None else None
        if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx") or add.outputs[0] in graph.outputs:
            continue
        a, b = add.inputs[0], add.inputs[1]
        if a is None or b is None or a.shape is None or a.shape != b.shape or len(a.shape) != 3:
            continue
        eps = norm.attributes.get("epsilon")
        skip = ir.node("SkipSimplifiedLayerNormalization", [a, b, norm.inputs[1]], domain="com.microsoft",
                       attributes={"epsilon": eps.as_float() if eps is not None else 1e-5}, num_outputs=4)
        out, total = norm.outputs[0], add.outputs[0]
        _like(skip.outputs[0], out)
        _like(skip.outputs[3], total)
        graph.insert_before(add, skip)
        ir.convenience.replace_all_uses_with(out, skip.outputs[0])
        ir.convenience.replace_all_uses_with(total, skip.outputs[3])
        names = out.name, total.name
        graph.remove(norm, safe=True)
        graph.remove(add, safe=True)
        skip.outputs[0].name, skip.outputs[3].name = names
        fused += 1
    return fused


def _like(new: ir.Value, old: ir.Value) -> None:
    new.shape = old.shape
    if old.dtype is not None:
        new.dtype = old.dtype


def _drop_unused_initializers(graph: ir.Graph) -> None:
    for name, v in list(graph.initializers.items()):
        if not v.uses() and v not in graph.outputs and v not in graph.inputs:
            del graph.initializers[name]


def _qkv_key(node: ir.Node | None) -> tuple[object, ...] | None:
    """What two q/k/v projections must share to be stacked: kind, input, K/bits/block/level, zero points."""
    if node is None or len(node.outputs[0].uses()) != 1 or node.outputs[0].is_graph_output():
        return None
    if node.op_type == "MatMulNBits" and node.domain == "com.microsoft" and len(node.inputs) in (3, 4):
        consts = [_const(v) for v in node.inputs[1:]]
        if any(c is None for c in consts):
            return None
        attrs = tuple(node.attributes[k].as_int() if k in node.attributes else None
                      for k in ("K", "bits", "block_size", "accuracy_level"))
        return ("MatMulNBits", node.inputs[0], attrs, len(node.inputs))
    if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
        w = _const(node.inputs[1])
        if w is None or w.ndim != 2:
            return None
        return ("MatMul", node.inputs[0], (w.shape[0], w.dtype.str), 2)
    return None


def fuse_qkv(model: ir.Model) -> int:
    """q, k, v projections (MatMulNBits of one format, or MatMul with constant weights) reading the same
    input and read only by a GroupQueryAttention node become ONE projection whose output rows are q's,
    then k's, then v's, passed as the node's packed QKV (its key and value inputs left empty). Exact:
    every output column is the same dot product as before (MatMulNBits quantizes the shared input per
    block along K alike for all three). Two kernel launches fewer per layer, and one larger GEMV keeps
    the threads busier than three small ones. Returns how many layers were fused.
    """
    graph = model.graph
    fused = 0
    for gqa in list(graph):
        if gqa.op_type != "GroupQueryAttention" or gqa.domain != "com.microsoft" or len(gqa.inputs) < 3:
            continue
        projs = [v.producer() if v is not None else None for v in gqa.inputs[:3]]
        keys = [_qkv_key(p) for p in projs]
        if keys[0] is None or len(set(keys)) != 1 or len(set(map(id, projs))) != 3:
            continue
        nodes = [p for p in projs if p is not None]
        q = nodes[0]
        name = (q.name or "qkv") + ".qkv"

        if q.op_type == "MatMulNBits":
            stacked = [_stack(nodes, i, 0) for i in range(1, len(q.inputs))]  # B (N, kb, blob); scales, zp by row
            n = sum(p.attributes["N"].as_int() for p in nodes)
            attrs = {key: (n if key == "N" else a.value) for key, a in q.attributes.items()}
            inits = [_new_initializer(graph, f"{name}.{suffix}", arr)
                     for suffix, arr in zip(("B", "scales", "zero_points"), stacked, strict=False)]
            node = ir.node("MatMulNBits", [q.inputs[0], *inits], domain="com.microsoft", attributes=attrs)
        else:
            node = ir.node("MatMul", [q.inputs[0], _new_initializer(graph, f"{name}.weight", _stack(nodes, 1, 1))])
        graph.insert_before(q, node)
        if q.outputs[0].dtype is not None:
            node.outputs[0].dtype = q.outputs[0].dtype
        gqa.replace_input_with(0, node.outputs[0])
        gqa.replace_input_with(1, None)
        gqa.replace_input_with(2, None)
        for p in nodes:
            graph.remove(p, safe=True)
        fused += 1
    _drop_unused_initializers(graph)
    return fused


def _stack(nodes: list[ir.Node], i: int, axis: int) -> np.ndarray:
    """The constant input `i` of each node, concatenated along `axis`."""
    return np.concatenate([_const(p.inputs[i]) for p in nodes], axis=axis)  # type: ignore[misc]


def _new_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    a = np.ascontiguousarray(array)
    tensor = ir.tensor(a, name=name)
    value = ir.Value(name=name, const_value=tensor, shape=ir.Shape(a.shape), type=ir.TensorType(tensor.dtype))
    graph.register_initializer(value)
    return value
