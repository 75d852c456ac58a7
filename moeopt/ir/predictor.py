"""The routing predictor: LiteMoE's 2-layer MLP from the first MoE layer's router logits to the router
logits of every later MoE layer. It lives in the IR (saved with the checkpoint) because importance
estimation, the lowering (prefetch hints) and the runtime (expert prefetch) all use it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class RoutingPredictor(nn.Module):
    """(N, E_0) router logits of layer 0 -> list of (N, E_l) predicted logits for layers 1..L-1."""

    def __init__(self, in_experts: int, out_experts: list[int], hidden: int) -> None:
        super().__init__()
        self.in_experts, self.out_experts, self.hidden = in_experts, list(out_experts), hidden
        self.fc1 = nn.Linear(in_experts, hidden)
        self.fc2 = nn.Linear(hidden, sum(out_experts))

    def forward(self, logits0: torch.Tensor) -> list[torch.Tensor]:
        # Softmax input: the router's scale differs between models; its distribution does not.
        h = torch.relu(self.fc1(torch.softmax(logits0.float(), dim=-1)))
        return list(self.fc2(h).split(self.out_experts, dim=-1))

    def meta(self) -> dict[str, Any]:
        return {"in_experts": self.in_experts, "out_experts": self.out_experts, "hidden": self.hidden}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> RoutingPredictor:
        return cls(int(meta["in_experts"]), [int(e) for e in meta["out_experts"]], int(meta["hidden"]))
