"""`moeopt::moe_layer`: the canonical MoE layer as one opaque torch.library op.

torch.export keeps each MoE layer as a single node of this op, so `trace` shows one line per layer and
the lowering translates the node (with its attribute string) instead of an unrolled expert loop.
"""

from __future__ import annotations

import functools
import json

import torch

from moeopt.ir.compute import moe_compute
from moeopt.ir.spec import ExpertSpec, RouterSpec, SharedSpec

OP_NAME = "moeopt::moe_layer"


@functools.lru_cache(maxsize=256)
def parse_config(config: str) -> tuple[RouterSpec, ExpertSpec, tuple[SharedSpec, ...]]:
    """The op's static attribute: JSON of the router, expert and shared-expert specs."""
    d = json.loads(config)
    return (
        RouterSpec.from_dict(d["router"]),
        ExpertSpec.from_dict(d["experts"]),
        tuple(SharedSpec.from_dict(s) for s in d["shared"]),
    )


@torch.library.custom_op(OP_NAME, mutates_args=())
def moe_layer(
    x: torch.Tensor,
    router_w: torch.Tensor,
    router_b: torch.Tensor | None,
    score_bias: torch.Tensor | None,
    keep_mask: torch.Tensor,
    slot_of: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    b_in: torch.Tensor | None,
    b_out: torch.Tensor | None,
    shared: list[torch.Tensor],
    config: str,
) -> torch.Tensor:
    router, experts, shared_specs = parse_config(config)
    out, _ = moe_compute(
        x, router_w, router_b, score_bias, keep_mask, slot_of, w_in, w_out, b_in, b_out, shared,
        router, experts, shared_specs,
    )
    return out


@moe_layer.register_fake
def _moe_layer_fake(
    x: torch.Tensor,
    router_w: torch.Tensor,
    router_b: torch.Tensor | None,
    score_bias: torch.Tensor | None,
    keep_mask: torch.Tensor,
    slot_of: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    b_in: torch.Tensor | None,
    b_out: torch.Tensor | None,
    shared: list[torch.Tensor],
    config: str,
) -> torch.Tensor:
    return torch.empty_like(x)
