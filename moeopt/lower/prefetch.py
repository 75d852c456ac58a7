"""Prefetch hints: the routing predictor lowered into an ONNX graph as extra outputs.

The routing predictor maps what the first MoE layer sees (its input hidden state, or LiteMoE's router
logits) to every later layer's router logits; lowered right after the value it reads, it gives the
runtime each later layer's likely experts while layer 0 is still computing, so their weights can be
read before the layer that needs them runs. The MLP is a handful of standard ops ([Softmax for logits],
MatMul+Add, Relu, MatMul+Add, Split, TopK per later layer) and works on any leading shape of its input
((N, F) or (B, T, F)). Pruned experts are masked by an -inf bias on their fc2 columns,
which is exactly `masked_fill(~keep_mask, -inf)` on the predicted logits and costs no extra op.

The predictor's look-ahead heads (one per MoE layer j >= 2, reading layer j-1's input) are lowered the
same way right after that input (`add_lookahead_outputs`): in an offload artifact they come out of the
segment that ends at layer j-1's router, so the runtime can correct layer j's prefetches a layer ahead.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from moeopt.errors import BadInputError
from moeopt.ir.predictor import RoutingPredictor

OPSET = 18  # Softmax(axis=-1) and Split's `split` input need >= 13; the exporter writes 18
MIN_OPSET = 13


def _np(t: Any) -> np.ndarray:
    """A torch parameter (or array) as a float32 numpy array."""
    return np.ascontiguousarray(t.detach().cpu().numpy() if hasattr(t, "detach") else t, dtype=np.float32)


def _masks(predictor: RoutingPredictor, keep_masks: Sequence[Any] | None) -> list[np.ndarray | None]:
    """Per later layer j = 1..L-1, its (E_j,) bool keep mask or None; `keep_masks` has one per MoE layer."""
    later = predictor.out_experts
    if keep_masks is None:
        return [None] * len(later)
    if len(keep_masks) != len(later) + 1:
        raise BadInputError(
            f"prefetch: {len(keep_masks)} keep masks for a predictor of {len(later) + 1} MoE layers "
            "(give one per MoE layer, layer 0 included)"
        )
    out: list[np.ndarray | None] = []
    for j, (mask, e) in enumerate(zip(keep_masks[1:], later, strict=True), start=1):
        if mask is None:
            out.append(None)
            continue
        m = np.asarray(mask.cpu() if hasattr(mask, "cpu") else mask).astype(bool).reshape(-1)  # (E_j,)
        if m.shape != (e,):
            raise BadInputError(f"prefetch: keep mask of layer {j} covers {m.size} experts, the predictor {e}")
        if not m.any():
            raise BadInputError(f"prefetch: layer {j} keeps no expert; there is nothing to predict")
        out.append(m)
    return out


def prefetch_top(
    predictor: RoutingPredictor, top: int, keep_masks: Sequence[Any] | None = None
) -> dict[int, int]:
    """Per later layer j, how many experts its hint names: `top` clamped to the experts it keeps."""
    if top < 1:
        raise BadInputError(f"prefetch: top must be at least 1, got {top}")
    masks = _masks(predictor, keep_masks)
    return {
        j: min(top, e if m is None else int(m.sum()))
        for j, (e, m) in enumerate(zip(predictor.out_experts, masks, strict=True), start=1)
    }


def _fc2_bias(predictor: RoutingPredictor, masks: list[np.ndarray | None]) -> np.ndarray:
    """fc2's bias with -inf on the columns of pruned experts (so TopK never names them)."""
    bias = _np(predictor.fc2.bias).copy()  # (sum E_j,)
    start = 0
    for e, m in zip(predictor.out_experts, masks, strict=True):
        if m is not None:
            bias[start : start + e][~m] = -np.inf
        start += e
    return bias


def _masked_bias(bias: Any, mask: np.ndarray | None) -> np.ndarray:
    out = _np(bias).copy()
    if mask is not None:
        out[~mask] = -np.inf
    return out


def _names_in(graph: ir.Graph) -> set[str]:
    names = {v.name for v in graph.inputs if v.name} | set(graph.initializers)
    for node in graph.all_nodes():
        names.update(v.name for v in node.outputs if v.name)
    return names


def _const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    v = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    v.shape = ir.Shape(array.shape)
    v.dtype = ir.DataType.FLOAT if array.dtype == np.float32 else ir.DataType.INT64
    graph.register_initializer(v)
    return v


class _Nodes:
    """Nodes named ``{base}/{step}`` with outputs ``{base}.{step}`` (``{base}.{step}{i}`` for several),
    collected in order for one insertion."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.nodes: list[ir.Node] = []

    def add(self, op_type: str, inputs: Sequence[ir.Value], step: str, n_out: int = 1, **attrs: Any) -> ir.Node:
        node = ir.node(op_type, inputs, attrs or None, num_outputs=n_out, name=f"{self.base}/{step}")
        for i, out in enumerate(node.outputs):
            out.name = f"{self.base}.{step}" if n_out == 1 else f"{self.base}.{step}{i + 1}"
        self.nodes.append(node)
        return node

    def mlp(self, x: ir.Value, w1: ir.Value, b1: ir.Value, w2: ir.Value, b2: ir.Value,
            softmax: bool = False) -> ir.Value:
        """relu(x @ w1 + b1) @ w2 + b2 in float32 (x cast first if it is not; softmax of x first if asked),
        as torch runs the predictor."""
        if x.dtype is not None and x.dtype != ir.DataType.FLOAT:
            x = self.add("Cast", [x], "cast", to=int(ir.DataType.FLOAT)).outputs[0]
        if softmax:
            x = self.add("Softmax", [x], "softmax", axis=-1).outputs[0]
        h = self.add("MatMul", [x, w1], "fc1_matmul").outputs[0]  # (..., H)
        h = self.add("Add", [h, b1], "fc1").outputs[0]
        h = self.add("Relu", [h], "relu").outputs[0]
        y = self.add("MatMul", [h, w2], "fc2_matmul").outputs[0]  # (..., out)
        return self.add("Add", [y, b2], "fc2").outputs[0]


def add_prefetch_outputs(
    graph: ir.Graph,
    first: ir.Value,
    predictor: RoutingPredictor,
    *,
    top: int,
    keep_masks: Sequence[Any] | None = None,
    prefix: str = "prefetch",
) -> dict[int, str]:
    """Append the predictor after `first` (the value it reads: layer 0's MoE input or router logits, as
    ``predictor.source`` says) and one int64 (..., k_j) output per later MoE layer j.

    Each output holds the predicted ORIGINAL expert ids of layer j, best first (TopK of the predicted
    logits, pruned experts masked); k_j is `top` clamped to the experts layer j keeps. The nodes go
    right after the node that produces `first` (first, if it is a graph input), so a segment graph
    computes the hint as early as it can. `keep_masks` has one (E_l,) bool mask per MoE layer, layer 0
    included (its mask is not used). Returns {j: output name}.
    """
    if first.graph is not None and first.graph is not graph:
        raise BadInputError(f"prefetch: value '{first.name}' does not belong to the graph it is added to")
    width = first.shape[-1] if first.shape is not None and len(first.shape) > 0 else None
    if isinstance(width, int) and width != predictor.in_features:
        what = "hidden size" if predictor.source == "hidden" else "experts"
        raise BadInputError(
            f"prefetch: '{first.name}' has {width} features, the predictor reads {predictor.in_features} ({what})"
        )
    version = graph.opset_imports.get("", None)
    if version is None:
        graph.opset_imports[""] = OPSET
    elif version < MIN_OPSET:
        raise BadInputError(f"prefetch: the graph's opset is {version}, prefetch nodes need {MIN_OPSET} or later")
    masks = _masks(predictor, keep_masks)
    ks = prefetch_top(predictor, top, keep_masks)
    taken = _names_in(graph)
    clash = sorted(n for n in taken if n == prefix or n.startswith(f"{prefix}."))
    if clash:
        raise BadInputError(f"prefetch: the graph already has '{clash[0]}'; choose another prefix")

    w1 = _const(graph, f"{prefix}.fc1.weight", _np(predictor.fc1.weight).T.copy())  # (F, H)
    b1 = _const(graph, f"{prefix}.fc1.bias", _np(predictor.fc1.bias))  # (H,)
    w2 = _const(graph, f"{prefix}.fc2.weight", _np(predictor.fc2.weight).T.copy())  # (H, sum E_j)
    b2 = _const(graph, f"{prefix}.fc2.bias", _fc2_bias(predictor, masks))  # (sum E_j,)
    sizes = _const(graph, f"{prefix}.split", np.asarray(predictor.out_experts, dtype=np.int64))

    b = _Nodes(prefix)
    y = b.mlp(first, w1, b1, w2, b2, softmax=predictor.source == "logits")  # (..., sum E_j)
    parts = b.add("Split", [y, sizes], "logits_layer", n_out=len(ks), axis=-1).outputs  # (..., E_j) each

    lead = list(first.shape)[:-1] if first.shape is not None else None
    outputs: dict[int, str] = {}
    for (j, k), part in zip(ks.items(), parts, strict=True):
        kv = _const(graph, f"{prefix}.k{j}", np.asarray([k], dtype=np.int64))
        topk = b.add("TopK", [part, kv], f"topk_layer{j}", n_out=2, axis=-1, largest=1, sorted=1)
        ids = topk.outputs[1]
        ids.name = f"{prefix}.layer{j}"
        ids.dtype = ir.DataType.INT64
        if lead is not None:
            ids.shape = ir.Shape([*lead, k])
        topk.outputs[0].name = f"{prefix}.layer{j}.logits"
        graph.outputs.append(ids)
        outputs[j] = ids.name
    _insert_after(graph, first, b.nodes)
    return outputs


def _insert_after(graph: ir.Graph, value: ir.Value, nodes: list[ir.Node]) -> None:
    """Put `nodes` right after the node producing `value` (first in the graph if it is a graph input)."""
    producer = value.producer()
    if producer is not None:
        graph.insert_after(producer, nodes)
    elif len(graph) > 0:
        graph.insert_before(graph[0], nodes)
    else:
        graph.extend(nodes)


def _add_head(graph: ir.Graph, x: ir.Value, name: str, fc1: Any, fc2: Any, mask: np.ndarray | None, k: int,
              what: str, taken: set[str], in_features: int) -> str:
    """One head MLP (fc1, ReLU, fc2; masked experts at -inf) and TopK after `x`'s producer: the int64
    (..., k) output `name` of predicted original expert ids, best first."""
    if any(n == name or n.startswith(f"{name}.") or n.startswith(f"{name}/") for n in taken):
        raise BadInputError(f"prefetch: the graph already has '{name}'; choose another prefix")
    width = x.shape[-1] if x.shape is not None and len(x.shape) > 0 else None
    if isinstance(width, int) and width != in_features:
        raise BadInputError(f"prefetch: '{x.name}' has {width} features, the {what} reads {in_features}")
    w1 = _const(graph, f"{name}.fc1.weight", _np(fc1.weight).T.copy())  # (D, H)
    b1 = _const(graph, f"{name}.fc1.bias", _np(fc1.bias))
    w2 = _const(graph, f"{name}.fc2.weight", _np(fc2.weight).T.copy())  # (H, E_j)
    b2 = _const(graph, f"{name}.fc2.bias", _masked_bias(fc2.bias, mask))
    kv = _const(graph, f"{name}.k", np.asarray([k], dtype=np.int64))
    nodes = _Nodes(name)
    y = nodes.mlp(x, w1, b1, w2, b2)  # (..., E_j)
    topk = nodes.add("TopK", [y, kv], "topk", n_out=2, axis=-1, largest=1, sorted=1)
    ids = topk.outputs[1]
    ids.name, ids.dtype = name, ir.DataType.INT64
    if x.shape is not None:
        ids.shape = ir.Shape([*list(x.shape)[:-1], k])
    graph.outputs.append(ids)
    _insert_after(graph, x, nodes.nodes)
    return name


def add_lookahead_outputs(
    graph: ir.Graph,
    inputs: dict[int, ir.Value],
    predictor: RoutingPredictor,
    *,
    top: int,
    keep_masks: Sequence[Any] | None = None,
    prefix: str = "prefetch",
) -> dict[int, str]:
    """Append each look-ahead head j (`inputs[j]` is MoE layer j-1's input) and its int64 (..., k_j)
    output ``{prefix}.ahead{j}`` of layer j's predicted original expert ids, best first, right after the
    node that produces its input. Returns {j: output name}."""
    missing = sorted(set(predictor.ahead_layers) - set(inputs))
    if missing or set(inputs) - set(predictor.ahead_layers):
        raise BadInputError(f"prefetch: look-ahead inputs for layers {sorted(inputs)}, the predictor has heads "
                            f"for {predictor.ahead_layers}")
    masks = _masks(predictor, keep_masks)
    ks = prefetch_top(predictor, top, keep_masks)
    taken = _names_in(graph)
    return {j: _add_head(graph, inputs[j], f"{prefix}.ahead{j}", *predictor.head(j), masks[j - 1], ks[j],
                         f"look-ahead head of layer {j}", taken, predictor.in_features)
            for j in predictor.ahead_layers}


def far_top(predictor: RoutingPredictor, top: int, keep_masks: Sequence[Any] | None = None) -> dict[int, int]:
    """Per far-head layer j, how many experts its output names: `top` clamped to the experts j keeps."""
    later = prefetch_top(predictor, top, keep_masks)
    first = predictor.first_experts
    if keep_masks is not None and keep_masks[0] is not None:
        first = int(np.asarray(keep_masks[0]).astype(bool).sum())
    return {j: later[j] if j else min(top, first) for j in predictor.far_layers}


def _first_mask(keep_masks: Sequence[Any] | None) -> np.ndarray | None:
    if keep_masks is None or keep_masks[0] is None:
        return None
    m = keep_masks[0]
    return np.asarray(m.cpu() if hasattr(m, "cpu") else m).astype(bool).reshape(-1)


def add_far_outputs(
    graph: ir.Graph,
    inputs: dict[int, ir.Value],
    predictor: RoutingPredictor,
    *,
    top: int,
    keep_masks: Sequence[Any] | None = None,
    prefix: str = "prefetch",
) -> dict[int, str]:
    """Append each far head j (`inputs[j]` is MoE layer `predictor.far_source(j)`'s input) and its int64
    (..., k_j) output ``{prefix}.far{j}``: layer j's predicted original expert ids two layers ahead (of
    the next step when its source is not below j), right after the node that produces its input.
    Returns {j: output name}."""
    if set(inputs) != set(predictor.far_layers):
        raise BadInputError(f"prefetch: far-head inputs for layers {sorted(inputs)}, the predictor has far heads "
                            f"for {predictor.far_layers}")
    masks = [_first_mask(keep_masks), *_masks(predictor, keep_masks)]
    ks = far_top(predictor, top, keep_masks)
    taken = _names_in(graph)
    return {j: _add_head(graph, inputs[j], f"{prefix}.far{j}", *predictor.far_head(j), masks[j], ks[j],
                         f"far head of layer {j}", taken, predictor.in_features)
            for j in predictor.far_layers}


def early_top(predictor: RoutingPredictor, top: int, keep_masks: Sequence[Any] | None = None) -> int:
    """How many experts the early head's output names: `top` clamped to the experts the first layer keeps."""
    first = predictor.first_experts
    if keep_masks is not None and keep_masks[0] is not None:
        first = int(np.asarray(keep_masks[0]).astype(bool).sum())
    return min(top, first)


def add_early_output(graph: ir.Graph, x: ir.Value, predictor: RoutingPredictor, *, top: int,
                     keep_masks: Sequence[Any] | None = None, prefix: str = "prefetch") -> str:
    """Append the early head after `x` (the last MoE layer's input) and its int64 (..., k) output
    ``{prefix}.early0``: the NEXT step's first-layer expert ids, best first (`RoutingPredictor.early`)."""
    return _add_head(graph, x, f"{prefix}.early0", *predictor.early_head(), _first_mask(keep_masks),
                     early_top(predictor, top, keep_masks), "early head", _names_in(graph), predictor.in_features)


def add_next_output(graph: ir.Graph, logits: ir.Value, predictor: RoutingPredictor, *,
                    top: int | None = None, prefix: str = "prefetch") -> str:
    """Append the next-token table after the LM head: ``{prefix}.next0`` (..., m) int64 = the first MoE
    layer's experts of the argmax token of each position, best first (ArgMax, then Gather from the
    table's first m = min(`top`, its width) columns; None: all of them)."""
    table = predictor.next_table
    if table is None:
        raise BadInputError("prefetch: the routing predictor has no next-token table")
    if top is not None:
        if top < 1:
            raise BadInputError(f"prefetch: top must be at least 1, got {top}")
        table = table[:, :top]
    name = f"{prefix}.next0"
    if any(n == name or n.startswith(f"{name}.") for n in _names_in(graph)):
        raise BadInputError(f"prefetch: the graph already has '{name}'; choose another prefix")
    vocab = logits.shape[-1] if logits.shape is not None and len(logits.shape) > 0 else None
    if isinstance(vocab, int) and vocab != table.shape[0]:
        raise BadInputError(f"prefetch: '{logits.name}' has {vocab} tokens, the next-token table {table.shape[0]}")
    tab = ir.Value(name=f"{name}.table", const_value=ir.tensor(table.cpu().numpy().astype(np.int64),
                                                                name=f"{name}.table"))
    tab.shape, tab.dtype = ir.Shape(list(table.shape)), ir.DataType.INT64
    graph.register_initializer(tab)
    arg = ir.node("ArgMax", [logits], {"axis": -1, "keepdims": 0}, name=f"{name}/argmax")
    arg.outputs[0].name = f"{name}.token"
    gather = ir.node("Gather", [tab, arg.outputs[0]], {"axis": 0}, name=f"{name}/gather")
    ids = gather.outputs[0]
    ids.name, ids.dtype = name, ir.DataType.INT64
    if logits.shape is not None:
        ids.shape = ir.Shape([*list(logits.shape)[:-1], int(table.shape[1])])
    graph.outputs.append(ids)
    _insert_after(graph, logits, [arg, gather])
    return name


TOKEN_TABLE = "prefetch-token0.npy"


def write_token_table(predictor: RoutingPredictor, folder: Path, *, top: int) -> dict[str, str]:
    """The next-token table as a file of the artifact: row t = the first MoE layer's experts of token t, best
    first, its first `top` columns (int16). Returns the manifest's ``"token"`` entry, ``{"0": file name}``.

    The graph's ``next0`` output looks the table up for the argmax of the last logits, which is the token
    fed next only under greedy decoding. With the file, a runtime looks up the token it actually feeds,
    once it is chosen and before the first segment runs (`moeopt.runtime.offload`)."""
    table = predictor.next_table
    if table is None:
        raise BadInputError("prefetch: the routing predictor has no next-token table")
    if top < 1:
        raise BadInputError(f"prefetch: top must be at least 1, got {top}")
    np.save(folder / TOKEN_TABLE, table[:, :top].cpu().numpy().astype(np.int16))
    return {"0": TOKEN_TABLE}


def lookahead_hints_numpy(
    x: np.ndarray, predictor: RoutingPredictor, layer: int, top: int, keep_masks: Sequence[Any] | None = None
) -> np.ndarray:
    """A look-ahead output in numpy: layer `layer`'s (..., k) predicted expert ids from layer `layer - 1`'s
    (..., D) input."""
    if layer not in predictor.ahead_layers:
        raise BadInputError(f"prefetch: the predictor has no look-ahead head for layer {layer}")
    fc1, fc2 = predictor.head(layer)
    mask = _masks(predictor, keep_masks)[layer - 1]
    h = np.maximum(np.asarray(x, dtype=np.float32) @ _np(fc1.weight).T + _np(fc1.bias), 0.0)
    y = h @ _np(fc2.weight).T + _masked_bias(fc2.bias, mask)
    k = prefetch_top(predictor, top, keep_masks)[layer]
    return np.argsort(-y, axis=-1, kind="stable")[..., :k].astype(np.int64)


def prefetch_meta(
    outputs: dict[int, str],
    predictor: RoutingPredictor,
    top: int,
    keep_masks: Sequence[Any] | None = None,
    ahead: dict[int, str] | None = None,
    following: str | None = None,
    far: dict[int, str] | None = None,
    early: str | None = None,
) -> dict[str, Any]:
    """What the manifest's "prefetch" section says about the hint outputs (JSON-ready: string keys).

    {"outputs": {"j": name}, "top": top, "k": {"j": k_j}, "ahead": {"j": name}, "params": predictor
    parameter count, "next": {"0": name} or {}}; k_j is the width of output j (`top` clamped to the
    experts layer j keeps), also of the look-ahead output of layer j. "next" is the next-token table's
    output: layer 0's experts of the NEXT step, from the last position. "far": {"j": name} are the far
    heads of the same step, "next_far": {"j": name} those that name the NEXT step's layer j from this
    step's last position (their source layer runs after j). "early": {"0": name} is the early head's
    output: layer 0's experts of the NEXT step from the last MoE layer's input, last position (before
    "next" exists). The lowering adds "token": {"0": file}, the
    same table as a (vocab, k) int16 .npy file (`write_token_table`), when the graph has "next".
    """
    ks = prefetch_top(predictor, top, keep_masks)
    return {
        "outputs": {str(j): name for j, name in sorted(outputs.items())},
        "top": int(top),
        "k": {str(j): ks[j] for j in sorted(outputs)},
        "ahead": {str(j): name for j, name in sorted((ahead or {}).items())},
        "next": {"0": following} if following else {},
        "far": {str(j): n for j, n in sorted((far or {}).items()) if predictor.far_source(j) < j},
        "next_far": {str(j): n for j, n in sorted((far or {}).items()) if predictor.far_source(j) >= j},
        "early": {"0": early} if early else {},
        "params": int(sum(p.numel() for p in predictor.parameters())),
    }


def prefetch_hints_numpy(
    first: np.ndarray, predictor: RoutingPredictor, top: int, keep_masks: Sequence[Any] | None = None
) -> dict[int, np.ndarray]:
    """The lowered graph's hints computed in numpy from the predictor's (..., F) input: {j: (..., k_j)
    int64 predicted expert ids}.

    For a runtime without the graph outputs (or a test) that wants the same answer.
    """
    masks = _masks(predictor, keep_masks)
    ks = prefetch_top(predictor, top, keep_masks)
    x = np.asarray(first, dtype=np.float32)  # (..., F)
    if predictor.source == "logits":
        z = x - x.max(axis=-1, keepdims=True)
        x = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
    h = np.maximum(x @ _np(predictor.fc1.weight).T + _np(predictor.fc1.bias), 0.0)  # (..., H)
    y = h @ _np(predictor.fc2.weight).T + _fc2_bias(predictor, masks)  # (..., sum E_j)
    out: dict[int, np.ndarray] = {}
    start = 0
    for (j, k), e in zip(ks.items(), predictor.out_experts, strict=True):
        part = y[..., start : start + e]  # (..., E_j)
        start += e
        out[j] = np.argsort(-part, axis=-1, kind="stable")[..., :k].astype(np.int64)
    return out
