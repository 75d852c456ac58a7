"""MoELayer: the canonical MoE block that replaces every source architecture's block in the host model."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from moeopt.ir.compute import RoutingTrace, moe_compute, shared_tensor_names
from moeopt.ir.ops import moe_layer
from moeopt.ir.spec import RouterSpec, SharedSpec, spec_key
from moeopt.ir.table import ExpertTable

_AS_OP: contextvars.ContextVar[bool] = contextvars.ContextVar("moeopt_as_op", default=False)


@contextlib.contextmanager
def layers_as_ops() -> Iterator[None]:
    """Inside this context MoELayer.forward calls the opaque `moeopt::moe_layer` op (for torch.export)."""
    token = _AS_OP.set(True)
    try:
        yield
    finally:
        _AS_OP.reset(token)


class DenseExpert(nn.Module):
    """A shared expert: gate_proj/up_proj/down_proj (or up_proj/down_proj) and an optional sigmoid gate."""

    def __init__(self, spec: SharedSpec, hidden: int) -> None:
        super().__init__()
        self.spec = spec
        if spec.glu:
            self.gate_proj = nn.Linear(hidden, spec.intermediate, bias=spec.bias)
        self.up_proj = nn.Linear(hidden, spec.intermediate, bias=spec.bias)
        self.down_proj = nn.Linear(spec.intermediate, hidden, bias=spec.bias)
        if spec.gated:
            self.gate = nn.Linear(hidden, 1, bias=False)

    def flat_tensors(self) -> list[torch.Tensor]:
        return [self.get_parameter(name) for name in shared_tensor_names(self.spec)]


Observer = Callable[["MoELayer", RoutingTrace], None]


class MoELayer(nn.Module):
    """Router + ExpertTable + shared experts, numerically equivalent to the source block it replaced.

    Attributes:
        index: position among the model's MoE layers (0-based); path: module path in the host model.
        tuple_output: forward returns `(out, None)`, for hosts that unpack the block's output as
            `hidden, _ = mlp(hidden)` (gpt-oss's router scores); `moe(x)` always gives the tensor.
    """

    def __init__(
        self,
        router: RouterSpec,
        table: ExpertTable,
        router_weight: torch.Tensor,  # (E, H)
        router_bias: torch.Tensor | None = None,  # (E,)
        score_bias: torch.Tensor | None = None,  # (E,)
        shared: list[DenseExpert] | None = None,
        *,
        index: int = 0,
        path: str = "",
        source_class: str = "",
        tuple_output: bool = False,
    ) -> None:
        super().__init__()
        self.router = router
        self.table = table
        self.router_weight = nn.Parameter(router_weight, requires_grad=False)
        self.router_bias = None if router_bias is None else nn.Parameter(router_bias, requires_grad=False)
        self.register_buffer("score_bias", score_bias)
        self.shared = nn.ModuleList(shared or [])
        self.index, self.path, self.source_class = index, path, source_class
        self.tuple_output = tuple_output
        self.observers: list[Observer] = []

    @property
    def shared_specs(self) -> tuple[SharedSpec, ...]:
        return tuple(m.spec for m in self.shared)  # type: ignore[misc]

    def op_config(self) -> str:
        return spec_key(self.router, self.table.spec, self.shared_specs)

    def _shared_tensors(self) -> list[torch.Tensor]:
        return [t for m in self.shared for t in m.flat_tensors()]  # type: ignore[operator]

    def forward(self, hidden_states: torch.Tensor) -> Any:  # (B, T, H) -> (B, T, H) [or (it, None)]
        out = self.moe(hidden_states)
        return (out, None) if self.tuple_output else out

    def moe(self, hidden_states: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T, H)
        """The layer's output tensor, whatever `tuple_output` says."""
        t = self.table
        args = (
            hidden_states, self.router_weight, self.router_bias, self.score_bias, t.keep_mask, t.slot_of,
            t.w_in, t.w_out, t.b_in, t.b_out, self._shared_tensors(),
        )
        if _AS_OP.get():
            return moe_layer(*args, self.op_config())  # type: ignore[no-any-return]
        out, trace = moe_compute(*args, self.router, t.spec, self.shared_specs)  # type: ignore[arg-type]
        for obs in self.observers:
            obs(self, trace)
        return out

    def meta(self) -> dict[str, Any]:
        out = {
            "index": self.index,
            "path": self.path,
            "source_class": self.source_class,
            "router": self.router.to_dict(),
            "has_router_bias": self.router_bias is not None,
            "has_score_bias": self.score_bias is not None,
            "shared": [s.to_dict() for s in self.shared_specs],
            "table": self.table.meta(),
        }
        if self.tuple_output:
            out["tuple_output"] = True
        return out

    def extra_repr(self) -> str:
        r, t = self.router, self.table
        kept = int(t.keep_mask.sum())
        return (
            f"index={self.index}, experts={r.num_experts} (kept {kept}, slots {t.num_slots}), top_k={r.top_k}, "
            f"score={r.score_fn}, norm={r.norm}, shared={len(self.shared)}"
        )
