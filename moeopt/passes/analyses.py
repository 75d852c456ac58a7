"""Cheap structural analyses shared by passes and the CLI."""

from __future__ import annotations

from typing import Any

from moeopt.ir.model import MoEModel
from moeopt.passes.base import PassContext, register_analysis


@register_analysis("param-stats")
def param_stats(model: MoEModel, ctx: PassContext) -> Any:
    """Parameter counts and bytes split into expert / non-expert (see MoEModel.stats)."""
    return model.stats()


@register_analysis("expert-norms")
def expert_norms(model: MoEModel, ctx: PassContext) -> list[list[float]]:
    """Per layer, per physical slot: Frobenius norm of the expert's weights (magnitude baselines)."""
    out = []
    for layer in model.layers:
        t = layer.table
        out.append([float((t.w_in[s].float().norm() ** 2 + t.w_out[s].float().norm() ** 2).sqrt())
                    for s in range(t.num_slots)])
    return out
