"""Quantized non-expert linears as `com.microsoft.MatMulNBits`, rewritten into the exported graph.

The exporter turns each nn.Linear into `MatMul(x, Wᵀ)` (+ `Add(bias)`), and `graph_passes.fold_weight_layout`
stores Wᵀ as one (K, N) float initializer, but the exporter's constant folding renames it (`val_131`), so
the module path is lost. Linears are therefore matched by value: the (K, N) initializer that equals the
transposed dequantized weight of a quantized linear (`MoEModel.linears`, see `moeopt.quant.linears`) is
that linear. Equal values mean equal numerics, so two linears with identical weights cannot be confused
in any way that matters. The MatMul becomes MatMulNBits in place (its output value, name and uses stay),
reading the packed codes, scales and zero points at the artifact's accuracy level; the float initializer
goes, which is where the bytes are saved. A bias stays the exporter's Add.

`lower` collects the matched paths over every exported graph (`matches`) and refuses an artifact in
which a quantized linear was not found (`check_matched`): it would otherwise run float weights silently.
Offload artifacts go through the same export before they are cut into segments, so their segments carry
the MatMulNBits nodes and their packed initializers like any other node.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from moeopt.errors import UnsupportedModelError
from moeopt.lower.onnx_experts import MSFT_DOMAIN
from moeopt.lower.onnx_quant import _SETTINGS, NBITS_BLOCKS, QuantSettings, _block, to_ort

_MATCHED: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar("moeopt_linears", default=None)
STATS: dict[str, int] = {"matmulnbits-linears": 0}


@contextlib.contextmanager
def matches() -> Iterator[set[str]]:
    """Collect the paths of the linears `replace_linears` rewrites inside the block (over all graphs)."""
    seen: set[str] = set()
    token = _MATCHED.set(seen)
    try:
        yield seen
    finally:
        _MATCHED.reset(token)


def check_linears(model: Any) -> None:
    """Refuse packed linears that no longer describe their module's weight (a pass changed it since)."""
    from moeopt.quant.groupwise import Quantized, dequantize

    for path, q in model.linears.items():
        try:
            mod = model.hf.get_submodule(path)
        except AttributeError:
            raise UnsupportedModelError(f"quantized linear '{path}' is not a module of the model") from None
        w = getattr(mod, "weight", None)
        if w is None or tuple(w.shape) != (q.rows, q.cols):
            raise UnsupportedModelError(f"quantized linear '{path}' does not match its module's weight shape")
        deq = dequantize(Quantized(q.rows, q.cols, q.bits, q.group_size, q.packed, q.scales, q.zero_points))
        if not torch.equal(deq, w.detach().float()):
            raise UnsupportedModelError(f"quantized linear '{path}': its weight no longer equals the packed form; "
                                        "re-run the quantize pass on the float model")


def check_matched(model: Any, seen: set[str]) -> None:
    missing = [p for p in model.linears if p not in seen]
    if missing:
        raise UnsupportedModelError(
            f"quantized linear '{missing[0]}' ({len(missing)} in all) was not found as a MatMul with a constant "
            "weight in the exported graph; it would run in float, so the lowering stops")


def _digest(a: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(a, dtype=np.float32).tobytes(), digest_size=16).digest()


def _initializer(graph: ir.Graph, name: str, array: np.ndarray | torch.Tensor) -> ir.Value:
    a = array.detach().numpy() if isinstance(array, torch.Tensor) else array
    a = np.ascontiguousarray(a)
    tensor = ir.tensor(a, name=name)
    value = ir.Value(name=name, const_value=tensor, shape=ir.Shape(a.shape), type=ir.TensorType(tensor.dtype))
    graph.register_initializer(value)
    return value


def replace_linears(model_ir: ir.Model, model: Any) -> int:
    """Rewrite the MatMuls of the quantized linears as MatMulNBits; returns how many nodes were rewritten."""
    if not model.linears:
        return 0
    settings = _SETTINGS.get() or QuantSettings()
    index: dict[tuple[tuple[int, int], bytes], str] = {}
    for path in model.linears:
        w_t = model.hf.get_submodule(path).weight.detach().float().T.numpy()  # (K, N) as the graph stores it
        index.setdefault((w_t.shape, _digest(w_t)), path)
    shapes = {key[0] for key in index}
    graph = model_ir.graph
    seen = _MATCHED.get()
    done = 0
    for node in list(graph):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        b = node.inputs[1]
        tensor = None if b is None else ir.convenience.get_const_tensor(b)
        if b is None or tensor is None or tuple(tensor.shape) not in shapes:
            continue
        arr = tensor.numpy()
        path = index.get((arr.shape, _digest(arr)))
        if path is None:
            continue
        _rewrite(graph, node, model.linears[path], f"{path}.q", settings)
        done += 1
        if seen is not None:
            seen.add(path)
    for name, v in list(graph.initializers.items()):  # the float weights the rewrite left unread
        if not v.uses() and v not in graph.outputs and v not in graph.inputs:
            del graph.initializers[name]
    if done and MSFT_DOMAIN not in model_ir.opset_imports:
        model_ir.opset_imports[MSFT_DOMAIN] = 1
    STATS["matmulnbits-linears"] += done
    return done


def _rewrite(graph: ir.Graph, node: ir.Node, q: Any, name: str, settings: QuantSettings) -> None:
    """MatMul(x, W) -> MatMulNBits(x, codes, scales[, zero_points]) in place."""
    block = _block(int(q.group_size), (), NBITS_BLOCKS)
    assert block is not None  # every supported group splits into a MatMulNBits block
    m = to_ort(q, block)  # 3-bit widened to 4, groups over 128 split: exact
    kb = int(m.scales.shape[1])
    inputs = [
        _initializer(graph, f"{name}.B", m.packed.reshape(m.rows, kb, -1)),  # (N, k_blocks, blob)
        _initializer(graph, f"{name}.scales", m.scales.float().reshape(-1)),  # (N * k_blocks,)
    ]
    if m.zero_points is not None:
        inputs.append(_initializer(graph, f"{name}.zero_points", m.zero_points.reshape(-1)))
    node.resize_inputs(1 + len(inputs))
    for i, v in enumerate(inputs, start=1):
        node.replace_input_with(i, v)
    node.op_type, node.domain, node.version = "MatMulNBits", MSFT_DOMAIN, None
    for key, val in {"K": m.cols, "N": m.rows, "bits": m.bits, "block_size": m.group_size,
                     "accuracy_level": settings.accuracy_level}.items():
        node.attributes[key] = ir.AttrInt64(key, int(val))
