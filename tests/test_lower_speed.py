"""Compile-speed changes that must not change the artifact: the exporter's optimiser with the fast
multi-output matching gives the same graph, byte for byte."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper
from onnxscript._framework_apis.torch_2_9 import optimize
from onnxscript.rewriter import _matcher

from moeopt.lower.rewriter_speed import fast_multi_output_matching


def _rotary_like(layers: int) -> bytes:
    """A chain of rotate-half blocks (two Slices of one tensor: the SlicesSplit pattern) between other ops."""
    nodes, inits = [], []
    for name, value in (("b0", [0]), ("e0", [8]), ("b1", [8]), ("e1", [16]), ("ax", [-1]), ("mid", [3])):
        inits.append(numpy_helper.from_array(np.array(value, dtype=np.int64), name))
    inits.append(numpy_helper.from_array(np.full((16,), 0.5, dtype=np.float32), "half"))
    x = "x"
    for i in range(layers):
        nodes += [
            # upper half first: onnxscript pairs a Slice with the first fitting Slice in graph order, itself
            # included, so (lower, upper) is only found when the upper half comes earlier
            helper.make_node("Slice", [x, "b1", "e1", "ax"], [f"hi{i}"]),
            helper.make_node("Slice", [x, "b0", "e0", "ax"], [f"lo{i}"]),
            helper.make_node("Neg", [f"hi{i}"], [f"nh{i}"]),
            helper.make_node("Concat", [f"nh{i}", f"lo{i}"], [f"rot{i}"], axis=-1),
            helper.make_node("Slice", [f"rot{i}", "b0", "mid", "ax"], [f"odd{i}"]),  # a Slice that fits no pair
            helper.make_node("Mul", [f"rot{i}", "half"], [f"m{i}"]),
            helper.make_node("Relu", [f"m{i}"], [f"r{i}"]),
            helper.make_node("Add", [x, f"r{i}"], [f"y{i}"]),
        ]
        x = f"y{i}"
    outputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [2, 4, 16])]
    outputs += [helper.make_tensor_value_info(f"odd{i}", TensorProto.FLOAT, None) for i in range(layers)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 16])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


def _optimised(proto: bytes) -> tuple[bytes, list[str]]:
    import onnx

    model = ir.serde.deserialize_model(onnx.load_from_string(proto))
    optimize(model)  # what torch.onnx.export(optimize=True) runs
    return ir.serde.serialize_model(model).SerializeToString(), [n.op_type for n in model.graph]


def test_fast_multi_output_matching_gives_the_same_graph_and_restores_the_matcher() -> None:
    proto = _rotary_like(6)
    original = _matcher.SimplePatternMatcher.match
    reference, ops = _optimised(proto)
    assert ops.count("Split") == 6 and "Slice" in ops  # the pattern fired (not a vacuous comparison)
    tried: list[int] = []
    multi = _matcher.SimplePatternMatcher._multi_match

    def counting(self, candidate, check_removable):  # type: ignore[no-untyped-def]
        tried.append(1)
        return multi(self, candidate, check_removable)

    _matcher.SimplePatternMatcher._multi_match = counting  # type: ignore[method-assign]
    try:
        with fast_multi_output_matching():
            fast, _ = _optimised(proto)
        fast_tries = len(tried)
        tried.clear()
        _optimised(proto)
    finally:
        _matcher.SimplePatternMatcher._multi_match = multi  # type: ignore[method-assign]
    assert fast == reference
    assert fast_tries * 4 < len(tried)  # every non-Slice node tried each Slice before
    assert _matcher.SimplePatternMatcher.match is original
