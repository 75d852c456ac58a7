"""A faster, result-identical way for onnxscript's rewriter to try its multi-output patterns.

`torch.onnx.export(optimize=True)` runs onnxscript's rewrite rules over every node. For a pattern with
several output nodes (the default set has one: `SlicesSplit`, two Slices of one tensor -> Split),
onnxscript 0.7's `SimplePatternMatcher.match` indexes the whole graph by op type and then tries every
candidate combination, for EVERY node of the graph, although a node whose op is not the pattern's first
output op fails on the first comparison of every combination. That is quadratic in the graph: 153 s of a
14-layer Mixtral's export on 2 shared cores (3,900 nodes), more than tracing and decomposition together.

`fast_multi_output_matching` answers those nodes "no match" at once, after the same op-type and domain
test the matcher's first comparison makes; every other node goes through the original code. A failed
match has no effect on the graph (the rule set moves to the next rule), so the rewritten model is the same
node for node (tests/test_lower_speed.py compares the serialised optimiser outputs). With a matching
tracer (onnxscript's debugging aid) the original path runs unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def fast_multi_output_matching() -> Iterator[None]:
    """Within the block, multi-output patterns skip nodes that cannot be their first output node."""
    try:
        from onnxscript.rewriter import _basics, _matcher
    except ImportError:  # another onnxscript layout: run it as it is
        yield
        return
    cls: Any = getattr(_matcher, "SimplePatternMatcher", None)
    original = getattr(cls, "match", None)
    if original is None or getattr(original, "_moeopt_fast", False):
        yield
        return

    def match(self: Any, model: Any, graph_or_function: Any, node: Any, *, verbose: int = 0,
              remove_nodes: bool = True, tracer: Any = None) -> Any:
        pattern = self.pattern
        if tracer is None and not pattern.has_single_output_node:
            try:
                first = pattern.output_nodes[0]
                fits = first.op.matches(node.op_type) and first.domain.matches(node.domain)
            except AttributeError:  # another pattern representation: let the original decide
                fits = True
            if not fits:
                return _basics.MatchResult().fail("op mismatch with the pattern's first output node")
        return original(self, model, graph_or_function, node, verbose=verbose, remove_nodes=remove_nodes,
                        tracer=tracer)

    match._moeopt_fast = True  # type: ignore[attr-defined]
    cls.match = match
    try:
        yield
    finally:
        cls.match = original
