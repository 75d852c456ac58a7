"""Store float16 block scales as float16 in a written graph, cast to float32 when the session loads.

`quantize{scale-dtype=float16}` rounds every block scale to float16 before the codes are chosen
(`moeopt.quant.groupwise.scale_storage`), but MatMulNBits and QMoE take scales of the activations' type
(float32 here). The export therefore writes them as float32 initializers holding float16 values, and ORT's
offline optimisation keeps them so. This pass, run on the saved graph after that optimisation, replaces each
such initializer by its float16 copy and a `Cast(to=FLOAT)`: half the scale bytes in the file. ORT folds
the Cast back into a float32 initializer at session creation (constant folding, any optimisation level
but "disabled"; with "disabled" the Cast runs each step on a few KB), so the kernels, their prepacking and
every output are unchanged: the values are exactly equal (float16 -> float32 is exact).

Only scale inputs of MatMulNBits (input 2) and QMoE (inputs 3, 6, 9) are touched, and only where every
value is a finite float16 value; anything else is left as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from moeopt.ir.model import MoEModel

SCALE_INPUTS = {"MatMulNBits": (2,), "QMoE": (3, 6, 9)}  # com.microsoft op -> input indices holding scales
EXTERNAL_MIN_BYTES = 1024  # initializers this large go to the `.data` file (here and in `artifact.optimize_offline`)


def _is_half(a: np.ndarray) -> bool:
    if a.dtype != np.float32 or not np.isfinite(a).all():
        return False
    with np.errstate(over="ignore"):
        return bool(np.array_equal(a.astype(np.float16).astype(np.float32), a))


def store_half_scales(onnx_path: Path) -> int:
    """Rewrite `onnx_path` (and its `.data` file) with float16 scale initializers; returns the bytes saved."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(onnx_path))  # with its external data: the file is rewritten whole
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    names = {node.input[i] for node in graph.node if node.domain == "com.microsoft"
             for i in SCALE_INPUTS.get(node.op_type, ()) if i < len(node.input) and node.input[i] in inits}
    casts, saved = [], 0
    for name in sorted(names):
        arr = numpy_helper.to_array(inits[name])
        if not _is_half(arr):
            continue
        half = numpy_helper.from_array(arr.astype(np.float16), f"{name}.f16")
        graph.initializer.remove(inits[name])
        graph.initializer.append(half)
        casts.append(helper.make_node("Cast", [half.name], [name], name=f"{name}.cast", to=TensorProto.FLOAT))
        saved += arr.nbytes // 2
    if not casts:
        return 0
    for i, node in enumerate(casts):  # graph inputs of nothing but initializers: first, in a stable order
        graph.node.insert(i, node)
    data = onnx_path.parent / (onnx_path.name + ".data")
    if data.exists():  # keep the layout the graph had: weights beside it, or inline
        data.unlink()
        onnx.save_model(model, str(onnx_path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=EXTERNAL_MIN_BYTES)
    else:
        onnx.save_model(model, str(onnx_path))
    return saved


def has_half_scales(model: MoEModel) -> bool:
    """Whether any quantized matrix of the model (routed experts or non-expert linears) stores float16 scales."""
    import torch

    mats = [q for layer in model.layers for q in layer.table.quantized.values()] + list(model.linears.values())
    return any(q.scales.dtype == torch.float16 for q in mats)
