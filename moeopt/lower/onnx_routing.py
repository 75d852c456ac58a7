"""The canonical router as standard ONNX ops: logits -> dense per-slot weights (N, S).

It mirrors `moeopt.ir.routing.route` operation for operation (score function, keep_mask as -inf before
any top-k, group-limited choice, normalisation, scaling) and then adds the weights of choices that share
a physical slot (`slot_of`), so the expert part of the layer only ever sees one weight per slot.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from onnxscript import opset18

from moeopt.ir.spec import RouterSpec

op: Any = opset18  # untyped on purpose: onnxscript's per-op stubs do not fit traced values

Value = Any  # an onnxscript/onnx-ir value while the exporter traces a translation function


def const_f(v: float) -> Value:
    return op.Constant(value_float=float(v))


def const_i(*v: int) -> Value:
    """A 1-D int64 constant (shapes, axes, k)."""
    return op.Constant(value_ints=list(v))


NEG_INF = float("-inf")


def zeros_like_shape(shape: Value) -> Value:
    """float32 zeros of a runtime shape (from ConstantOfShape, so -inf inputs cannot turn them into NaN)."""
    return op.ConstantOfShape(shape, value=ir.tensor(np.zeros(1, dtype=np.float32)))


def _mask(cond: Value, x: Value) -> Value:
    """`x` where cond, -inf elsewhere (torch's masked_fill(~cond, -inf))."""
    return op.Where(cond, x, const_f(NEG_INF))


@cache
def tie_order(n: int, k: int, sorted_topk: bool) -> tuple[int, ...]:
    """The order in which torch's CPU top-k picks k of n EQUAL values, then the others ascending.

    ONNX TopK breaks ties by the lowest index; torch's CPU kernel (nth_element / partial_sort) by an
    order of its own: [6, 5] for top-2 of 8 equal values. An untrained router (transformers initialises
    AFMoE's to zeros) gives every token n equal scores, so the source model's experts are the ones torch
    picks from a tie; ranking the columns in this order before TopK makes ONNX pick the same ones, and
    changes nothing where the values differ.
    """
    first = torch.topk(torch.zeros(1, n), k, dim=-1, sorted=sorted_topk).indices[0].tolist()
    return (*first, *(i for i in range(n) if i not in first))


def top_k(x: Value, n: int, k: int, sorted_topk: bool = True) -> tuple[Value, Value]:
    """(values, indices) of ONNX TopK over the last axis of `x` (N, n), ties broken as torch breaks them."""
    perm = tie_order(n, k, sorted_topk)
    if perm == tuple(range(n)):
        return op.TopK(x, const_i(k), axis=-1, sorted=int(sorted_topk))
    p = const_i(*perm)
    values, idx = op.TopK(op.Gather(x, p, axis=1), const_i(k), axis=-1, sorted=int(sorted_topk))
    return values, op.Gather(p, idx, axis=0)


def _group_limit(choice: Value, spec: RouterSpec) -> Value:
    """DeepSeek-V3's group-limited choice: only the best `topk_group` groups compete."""
    if spec.n_group <= 1:
        return choice
    per = spec.num_experts // spec.n_group
    grouped = op.Reshape(choice, const_i(0, spec.n_group, per))  # (N, G, E/G)
    top2, _ = op.TopK(grouped, const_i(2), axis=-1)
    group_scores = op.ReduceSum(top2, const_i(-1), keepdims=0)  # (N, G)
    _, gidx = top_k(group_scores, spec.n_group, spec.topk_group, sorted_topk=False)  # (N, topk_group)
    ones = op.Expand(const_f(1.0), op.Shape(gidx))
    gmask = op.ScatterElements(zeros_like_shape(op.Shape(group_scores)), gidx, ones, axis=1)  # (N, G) 0/1
    emask = op.Reshape(op.Expand(op.Unsqueeze(gmask, const_i(-1)), op.Shape(grouped)), op.Shape(choice))
    return _mask(op.Greater(emask, const_f(0.5)), choice)


def _sparsemixer(scores: Value, eps: float) -> tuple[Value, Value]:
    """PhiMoE's eval-mode sparsemixer (see `moeopt.ir.routing._sparsemixer_eval`)."""
    two_eps = const_f(2 * eps)
    thr = op.ReduceMax(scores, const_i(-1), keepdims=1)  # (N, 1)
    ind = op.ArgMax(scores, axis=-1, keepdims=1)  # (N, 1)
    factor = op.Max(op.Abs(scores), thr)
    masked = op.Where(op.Greater(op.Div(op.Sub(thr, scores), factor), two_eps), const_f(NEG_INF), scores)
    mult1 = op.GatherElements(op.Softmax(masked, axis=-1), ind, axis=1)
    ninf = op.Expand(const_f(NEG_INF), op.Shape(ind))
    masked_scores = op.ScatterElements(scores, ind, ninf, axis=1)
    thr2 = op.ReduceMax(masked_scores, const_i(-1), keepdims=1)
    ind2 = op.ArgMax(masked_scores, axis=-1, keepdims=1)
    factor2 = op.Max(op.Abs(scores), thr2)
    masked2 = op.Where(
        op.Greater(op.Div(op.Sub(thr2, scores), factor2), two_eps), const_f(NEG_INF), masked_scores
    )
    mult2 = op.GatherElements(op.Softmax(masked2, axis=-1), ind2, axis=1)
    return op.Concat(mult1, mult2, axis=1), op.Concat(ind, ind2, axis=1)


def _normalise(w: Value, spec: RouterSpec) -> Value:
    if spec.norm != "none":
        total = op.ReduceSum(w, const_i(-1), keepdims=1)
        if spec.norm == "sum_eps":
            total = op.Add(total, const_f(spec.norm_eps))
        elif spec.norm == "clamp":
            total = op.Max(total, const_f(spec.norm_eps))
        w = op.Div(w, total)
    if spec.scale != 1.0:
        w = op.Mul(w, const_f(spec.scale))
    return w


def route(
    logits: Value,  # (N, E) float32
    spec: RouterSpec,
    keep_mask: Value,  # (E,) bool
    score_bias: Value | None,  # (E,)
) -> tuple[Value, Value]:
    """(weights, index) of the top-k kept experts, both (N, k), index over the ORIGINAL experts."""
    if spec.score_fn in ("softmax", "sigmoid"):
        scores = op.Softmax(logits, axis=-1) if spec.score_fn == "softmax" else op.Sigmoid(logits)
        base = logits if spec.choice_on_logits and spec.score_fn == "sigmoid" else scores
        choice = base if score_bias is None else op.Add(base, score_bias)
        choice = _group_limit(_mask(keep_mask, choice), spec)
        _, index = top_k(choice, spec.num_experts, spec.top_k, spec.sorted_topk)
        weights = op.GatherElements(scores, index, axis=1)
    elif spec.score_fn == "topk_softmax":
        chosen, index = top_k(_mask(keep_mask, logits), spec.num_experts, spec.top_k)
        weights = op.Softmax(chosen, axis=-1)
    else:
        weights, index = _sparsemixer(_mask(keep_mask, logits), spec.jitter_eps)
    return _normalise(weights, spec), index


def apply_capacity(
    weights: Value,  # (N, k)
    index: Value,  # (N, k)
    batch: Value,  # (1,) int64: B of the (B, T, H) input; tokens are counted per sequence
    spec: RouterSpec,
) -> Value:
    """Switch's capacity (see `moeopt.ir.routing.apply_capacity`): zero a choice past its expert's
    `capacity`-th token of the sequence, counting in token order."""
    if spec.capacity is None:
        return weights
    e, k = spec.num_experts, spec.top_k
    onehot = op.OneHot(index, const_i(e), op.Constant(value_floats=[0.0, 1.0]), axis=-1)  # (N, k, E)
    per_seq = op.Reshape(onehot, op.Concat(batch, const_i(-1, k, e), axis=0))  # (B, T, k, E)
    routed = op.CumSum(op.ReduceSum(per_seq, const_i(2), keepdims=0), op.Constant(value_int=1))  # (B, T, E)
    pos = op.GatherElements(op.Reshape(routed, const_i(-1, e)), index, axis=1)  # (N, k)
    return op.Where(op.Greater(pos, const_f(float(spec.capacity))), const_f(0.0), weights)


def slot_weights(
    weights: Value,  # (N, k)
    index: Value,  # (N, k) original experts
    slot_of: Value,  # (E,) int64
    num_slots: int,
) -> Value:
    """Dense (N, S) weights: every choice's weight added into its expert's slot (merged experts add)."""
    slot_idx = op.Gather(slot_of, index, axis=0)  # (N, k)
    # A pruned expert is only chosen when fewer than k experts are kept; like the reference, it adds
    # nothing (slot -1 would otherwise wrap around to the last slot).
    valid = op.GreaterOrEqual(slot_idx, const_i(0))
    slot_idx = op.Where(valid, slot_idx, const_i(0))
    weights = op.Where(valid, weights, const_f(0.0))
    n = op.Slice(op.Shape(weights), const_i(0), const_i(1))
    zeros = zeros_like_shape(op.Concat(n, const_i(num_slots), axis=0))  # (N, S)
    return op.ScatterElements(zeros, slot_idx, weights, axis=1, reduction="add")
