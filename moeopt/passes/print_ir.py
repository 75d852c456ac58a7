"""`print`: write the IR summary (layers, experts, parameters) to stdout or a file."""

from __future__ import annotations

import sys

from moeopt.ir.model import MoEModel
from moeopt.passes.base import Pass, PassContext, PassResult
from moeopt.passes.options import Option
from moeopt.passes.registry import register


@register
class PrintIR(Pass):
    name = "print"
    kind = "utility"
    summary = "print the IR summary"
    exact = True
    options = (
        Option("file", "path", None, "write to this file instead of stdout"),
        Option("max-layers", "int", -1, "list at most this many layers (-1: all)", min=-1),
    )

    def call(self, model: MoEModel, ctx: PassContext) -> PassResult:
        lines = model.summary().splitlines()
        n = self.opts["max-layers"]
        if n >= 0:
            head = [ln for ln in lines if not ln.startswith("  [")]
            layers = [ln for ln in lines if ln.startswith("  [")]
            extra = [f"  ... {len(layers) - n} more layers"] if len(layers) > n else []
            lines = head[:3] + layers[:n] + extra + head[3:]
        text = "\n".join(lines)
        if self.opts["file"] is not None:
            self.opts["file"].write_text(text + "\n")
        else:
            print(text, file=sys.stdout)
        return PassResult(model, False)
