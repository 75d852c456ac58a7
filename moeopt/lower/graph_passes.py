"""onnx-ir clean-ups applied to the exported graph before it is saved.

- `fold_weight_layout`: Transpose / Reshape chains on a weight (router transposes, the MoE node's
  gate/up interleave) are computed once here, so the saved weights are in the layout the kernels read
  and a session does not constant-fold (and briefly hold two copies of) every expert at load.
- `name_dynamic_dims`: readable names (batch, sequence, past_sequence ...) for the symbolic dims.
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
    for name, v in list(graph.initializers.items()):
        if not v.uses() and v not in graph.outputs and v not in graph.inputs:
            del graph.initializers[name]
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
