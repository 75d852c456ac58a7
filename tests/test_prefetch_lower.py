"""Prefetch hints lowered into ONNX: ORT's predicted experts equal the torch RoutingPredictor's top-k."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from moeopt.errors import BadInputError
from moeopt.ir.predictor import RoutingPredictor
from moeopt.lower.prefetch import add_prefetch_outputs, prefetch_hints_numpy, prefetch_meta

E, LATER, HIDDEN, N = 8, [8, 8, 8], 16, 64


def _predictor(out_experts: list[int] = LATER, seed: int = 0) -> RoutingPredictor:
    torch.manual_seed(seed)
    pred = RoutingPredictor(E, out_experts, HIDDEN).eval()
    with torch.no_grad():  # larger weights than the default init: distinct logits, no near-ties
        for p in pred.parameters():
            p.mul_(4.0)
    return pred


def _masks(seed: int = 1) -> list[np.ndarray]:
    """One (E,) keep mask per MoE layer (layer 0 included), a few experts pruned in each later layer."""
    rng = np.random.default_rng(seed)
    masks = [np.ones(E, dtype=bool)]
    for n_pruned in (3, 1, 5):
        m = np.ones(E, dtype=bool)
        m[rng.choice(E, n_pruned, replace=False)] = False
        masks.append(m)
    return masks


def _torch_topk(pred: RoutingPredictor, logits0: np.ndarray, top: int,
                masks: list[np.ndarray] | None) -> dict[int, np.ndarray]:
    """Reference: torch predictor, pruned experts filled with -inf, top-k indices per later layer."""
    with torch.no_grad():
        outs = pred(torch.from_numpy(logits0))
    ref = {}
    for j, o in enumerate(outs, start=1):
        if masks is not None:
            o = o.masked_fill(~torch.from_numpy(masks[j]), float("-inf"))
        k = min(top, int(masks[j].sum()) if masks is not None else o.shape[-1])
        ref[j] = o.topk(k, dim=-1).indices.numpy()
    return ref


def _run(model: ir.Model, feeds: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    data = proto.SerializeToString()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(names, feeds)


def _input_graph(dtype: ir.DataType = ir.DataType.FLOAT) -> tuple[ir.Model, ir.Value]:
    logits0 = ir.Value(name="logits0", shape=ir.Shape(["N", E]), type=ir.TensorType(dtype))
    graph = ir.Graph([logits0], [], nodes=[], opset_imports={"": 18}, name="g")
    return ir.Model(graph, ir_version=10), logits0


def _same_sets(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape and got.dtype == np.int64
    np.testing.assert_array_equal(np.sort(got, axis=-1), np.sort(want, axis=-1))


@pytest.mark.parametrize("top", [2, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_prefetch_outputs_match_torch_topk(top: int, masked: bool) -> None:
    pred = _predictor()
    masks = _masks() if masked else None
    model, logits0 = _input_graph()
    outputs = add_prefetch_outputs(model.graph, logits0, pred, top=top, keep_masks=masks)
    assert outputs == {j: f"prefetch.layer{j}" for j in (1, 2, 3)}
    x = np.random.default_rng(2).normal(0, 3, (N, E)).astype(np.float32)  # (N, E)
    got = _run(model, {"logits0": x}, list(outputs.values()))
    ref = _torch_topk(pred, x, top, masks)
    hints = prefetch_hints_numpy(x, pred, top, masks)
    for j, ids in zip(outputs, got, strict=True):
        _same_sets(ids, ref[j])
        _same_sets(hints[j], ref[j])
        if masks is not None:
            assert masks[j][ids].all(), f"layer {j}: a pruned expert was predicted"
            assert ids.shape[1] == min(top, int(masks[j].sum()))
    # The 5-pruned layer keeps 3 experts: top 3 there names exactly the kept set for every token.
    if masks is not None and top == 3:
        kept = np.flatnonzero(masks[3])
        np.testing.assert_array_equal(np.sort(got[2], axis=-1), np.broadcast_to(kept, (N, 3)))


def test_prefetch_reads_an_intermediate_value_of_a_bigger_graph() -> None:
    """logits0 = x @ W (B, T, E) feeds both an existing output and the predictor."""
    pred = _predictor([8, 6, 4], seed=3)
    d = 5
    x = ir.Value(name="x", shape=ir.Shape(["B", "T", d]), type=ir.TensorType(ir.DataType.FLOAT))
    w_np = np.random.default_rng(4).normal(0, 1, (d, E)).astype(np.float32)
    w = ir.Value(name="router.weight", const_value=ir.tensor(w_np, name="router.weight"))
    w.shape, w.dtype = ir.Shape(w_np.shape), ir.DataType.FLOAT
    mm = ir.node("MatMul", [x, w], name="router")
    logits = mm.outputs[0]
    logits.name = "router.logits"
    logits.shape, logits.dtype = ir.Shape(["B", "T", E]), ir.DataType.FLOAT  # as the exporter leaves them
    relu = ir.node("Relu", [logits], name="after")
    relu.outputs[0].name = "y"
    relu.outputs[0].shape, relu.outputs[0].dtype = ir.Shape(["B", "T", E]), ir.DataType.FLOAT
    graph = ir.Graph([x], [relu.outputs[0]], nodes=[mm, relu], initializers=[w], opset_imports={"": 18},
                     name="g")
    model = ir.Model(graph, ir_version=10)
    outputs = add_prefetch_outputs(graph, logits, pred, top=2, prefix="hint")
    assert [n.name for n in graph][:2] == ["router", "hint/softmax"]  # right after the router
    xs = np.random.default_rng(5).normal(0, 2, (2, 7, d)).astype(np.float32)  # (B, T, D)
    y, *got = _run(model, {"x": xs}, ["y", *outputs.values()])
    np.testing.assert_allclose(y, np.maximum(xs @ w_np, 0.0), rtol=1e-6, atol=1e-6)
    ref = _torch_topk(pred, (xs @ w_np).reshape(-1, E), 2, None)
    for j, ids in zip(outputs, got, strict=True):
        assert ids.shape == (2, 7, 2)
        _same_sets(ids.reshape(-1, 2), ref[j])
    meta = prefetch_meta(outputs, pred, 2)
    assert meta["outputs"] == {"1": "hint.layer1", "2": "hint.layer2", "3": "hint.layer3"}
    assert meta["k"] == {"1": 2, "2": 2, "3": 2}
    assert meta["params"] == E * HIDDEN + HIDDEN + HIDDEN * 18 + 18


def test_prefetch_casts_half_logits_to_float() -> None:
    """float16 router logits: the MLP runs in float32 as torch's `logits0.float()` does."""
    pred = _predictor(seed=6)
    model, logits0 = _input_graph(ir.DataType.FLOAT16)
    outputs = add_prefetch_outputs(model.graph, logits0, pred, top=2)
    x = np.random.default_rng(7).normal(0, 3, (N, E)).astype(np.float16)  # (N, E)
    got = _run(model, {"logits0": x}, list(outputs.values()))
    ref = _torch_topk(pred, x.astype(np.float32), 2, None)
    for j, ids in zip(outputs, got, strict=True):
        _same_sets(ids, ref[j])


def test_hidden_state_predictor_reads_the_layer_input() -> None:
    """source=hidden: no softmax, the (B, T, D) layer input feeds fc1; float16 input is cast first."""
    d = 12
    torch.manual_seed(8)
    pred = RoutingPredictor(d, [8, 6], HIDDEN, "hidden").eval()
    for dtype, np_dtype in ((ir.DataType.FLOAT, np.float32), (ir.DataType.FLOAT16, np.float16)):
        x = ir.Value(name="moe0.x", shape=ir.Shape(["B", "T", d]), type=ir.TensorType(dtype))
        graph = ir.Graph([x], [], nodes=[], opset_imports={"": 18}, name="g")
        model = ir.Model(graph, ir_version=10)
        outputs = add_prefetch_outputs(graph, x, pred, top=2)
        assert not any(n.op_type == "Softmax" for n in graph)
        xs = np.random.default_rng(9).normal(0, 1, (3, 5, d)).astype(np_dtype)  # (B, T, D)
        got = _run(model, {"moe0.x": xs}, list(outputs.values()))
        with torch.no_grad():
            outs = pred(torch.from_numpy(xs.astype(np.float32)).reshape(-1, d))
        hints = prefetch_hints_numpy(xs, pred, 2)
        for (j, ids), o in zip(zip(outputs, got, strict=True), outs, strict=True):
            assert ids.shape == (3, 5, 2)
            _same_sets(ids.reshape(-1, 2), o.topk(2, dim=-1).indices.numpy())
            _same_sets(hints[j].reshape(-1, 2), o.topk(2, dim=-1).indices.numpy())
    with pytest.raises(BadInputError, match=r"has 8 features, the predictor reads 12 \(hidden size\)"):
        other, logits0 = _input_graph()
        add_prefetch_outputs(other.graph, logits0, pred, top=2)


def test_prefetch_rejects_bad_inputs() -> None:
    pred = _predictor()
    model, logits0 = _input_graph()
    with pytest.raises(BadInputError, match="keep masks"):
        add_prefetch_outputs(model.graph, logits0, pred, top=2, keep_masks=_masks()[1:])
    with pytest.raises(BadInputError, match="top must be"):
        add_prefetch_outputs(model.graph, logits0, pred, top=0)
    with pytest.raises(BadInputError, match=r"reads 6 \(experts\)"):
        add_prefetch_outputs(model.graph, logits0, RoutingPredictor(6, [8], 4), top=2)
    none_kept = [*_masks()[:3], np.zeros(E, dtype=bool)]
    with pytest.raises(BadInputError, match="layer 3 keeps no expert"):
        add_prefetch_outputs(model.graph, logits0, pred, top=2, keep_masks=none_kept)
    add_prefetch_outputs(model.graph, logits0, pred, top=2)
    with pytest.raises(BadInputError, match="another prefix"):
        add_prefetch_outputs(model.graph, logits0, pred, top=2)


def test_lookahead_heads_match_torch_and_mask_pruned_experts() -> None:
    """Each head j reads its own (N, D) input (layer j-1's) and names layer j's kept experts only."""
    from moeopt.lower.prefetch import add_lookahead_outputs, lookahead_hints_numpy

    d = 10
    torch.manual_seed(11)
    pred = RoutingPredictor(d, LATER, HIDDEN, "hidden", ahead_hidden=7).eval()
    with torch.no_grad():
        for p in pred.parameters():
            p.mul_(4.0)
    assert pred.ahead_layers == [2, 3]
    masks = _masks()
    xs = {j: ir.Value(name=f"moe{j - 1}.x", shape=ir.Shape(["N", d]), type=ir.TensorType(ir.DataType.FLOAT))
          for j in (2, 3)}
    graph = ir.Graph(list(xs.values()), [], nodes=[], opset_imports={"": 18}, name="g")
    model = ir.Model(graph, ir_version=10)
    outputs = add_lookahead_outputs(graph, xs, pred, top=3, keep_masks=masks)
    assert outputs == {2: "prefetch.ahead2", 3: "prefetch.ahead3"}
    rng = np.random.default_rng(12)
    feeds = {v.name: rng.normal(0, 1, (N, d)).astype(np.float32) for v in xs.values()}
    got = _run(model, feeds, list(outputs.values()))
    for (j, ids) in zip(outputs, got, strict=True):
        x = feeds[f"moe{j - 1}.x"]
        with torch.no_grad():
            o = pred.ahead(j, torch.from_numpy(x)).masked_fill(~torch.from_numpy(masks[j]), float("-inf"))
        k = min(3, int(masks[j].sum()))
        _same_sets(ids, o.topk(k, dim=-1).indices.numpy())
        _same_sets(lookahead_hints_numpy(x, pred, j, 3, masks), ids)
        assert masks[j][ids].all()
    with pytest.raises(BadInputError, match="look-ahead inputs for layers"):
        add_lookahead_outputs(graph, {2: xs[2]}, pred, top=2)
    with pytest.raises(BadInputError, match="another prefix"):
        add_lookahead_outputs(graph, xs, pred, top=2)
    with pytest.raises(BadInputError, match="need input=hidden"):
        RoutingPredictor(E, LATER, HIDDEN, "logits", ahead_hidden=4)


def test_far_heads_match_torch_and_mask_pruned_experts() -> None:
    """Each far head j reads layer far_source(j)'s (N, D) input and names layer j's kept experts only (layer
    0's mask included); the manifest puts the heads that name the next step under "next_far"."""
    from moeopt.lower.prefetch import add_far_outputs

    d = 10
    torch.manual_seed(13)
    pred = RoutingPredictor(d, LATER, HIDDEN, "hidden", far_hidden=7, first_experts=E).eval()
    with torch.no_grad():
        for p in pred.parameters():
            p.mul_(4.0)
    masks = _masks()
    masks[0] = np.ones(E, dtype=bool)
    masks[0][[1, 6]] = False
    xs = {j: ir.Value(name=f"moe{pred.far_source(j)}.x", shape=ir.Shape(["N", d]),
                      type=ir.TensorType(ir.DataType.FLOAT)) for j in pred.far_layers}
    graph = ir.Graph(list(xs.values()), [], nodes=[], opset_imports={"": 18}, name="g")
    model = ir.Model(graph, ir_version=10)
    outputs = add_far_outputs(graph, xs, pred, top=3, keep_masks=masks)
    assert outputs == {0: "prefetch.far0", 1: "prefetch.far1", 3: "prefetch.far3"}
    rng = np.random.default_rng(14)
    feeds = {v.name: rng.normal(0, 1, (N, d)).astype(np.float32) for v in xs.values()}
    got = _run(model, feeds, list(outputs.values()))
    for j, ids in zip(outputs, got, strict=True):
        x = feeds[f"moe{pred.far_source(j)}.x"]
        with torch.no_grad():
            o = pred.far_logits(j, torch.from_numpy(x)).masked_fill(~torch.from_numpy(masks[j]), float("-inf"))
        k = min(3, int(masks[j].sum()))
        assert ids.shape == (N, k)
        _same_sets(ids, o.topk(k, dim=-1).indices.numpy())
        assert masks[j][ids].all()
    meta = prefetch_meta({}, pred, 3, masks, far=outputs)
    assert meta["far"] == {"3": "prefetch.far3"}
    assert meta["next_far"] == {"0": "prefetch.far0", "1": "prefetch.far1"}
    with pytest.raises(BadInputError, match="far-head inputs for layers"):
        add_far_outputs(graph, {0: xs[0]}, pred, top=2)
    with pytest.raises(BadInputError, match="another prefix"):
        add_far_outputs(graph, xs, pred, top=2)
