"""`verify`: run the IR verifier as a pipeline step (fails the pipeline on a broken invariant)."""

from __future__ import annotations

from moeopt.ir.model import MoEModel
from moeopt.ir.verify import check, verify
from moeopt.passes.base import Pass, PassContext, PassResult
from moeopt.passes.registry import register


@register
class Verify(Pass):
    name = "verify"
    kind = "utility"
    summary = "check the IR invariants (router width, slot maps, quantization scales)"
    exact = True

    def call(self, model: MoEModel, ctx: PassContext) -> PassResult:
        verify(model)
        return PassResult(model, False, stats={"layers-checked": len(model.layers), "problems": len(check(model))})
