"""The routing predictor: a 2-layer MLP from what the first MoE layer sees to the router logits of every
later MoE layer. It lives in the IR (saved with the checkpoint) because importance estimation, the
lowering (prefetch hints) and the runtime (expert prefetch) all use it.

Two inputs, both available once the first router has run:

- ``hidden`` (default): the first MoE layer's input, the (N, D) normalised hidden state its router reads.
- ``logits``: LiteMoE's original input, the softmax of the first router's (N, E_0) logits.

The router logits are a linear projection of the hidden state to E_0 dimensions, so they carry less of
what decides later layers' routing: on the reference model the hidden-state MLP's top-2 recall is
0.86/0.83/0.77 on layers 1-3 against 0.64/0.57/0.55 from the logits (bench/results/predictor.json).
"""

from __future__ import annotations

from typing import Any, Literal, cast

import torch
from torch import nn

from moeopt.errors import BadInputError

PredictorInput = Literal["hidden", "logits"]
INPUTS: tuple[PredictorInput, ...] = ("hidden", "logits")


class RoutingPredictor(nn.Module):
    """(N, F) first-layer features -> list of (N, E_l) predicted logits for MoE layers 1..L-1.

    F is the hidden size for ``source="hidden"``, E_0 for ``source="logits"``; `features` picks the
    right one from a layer's (hidden, logits).
    """

    def __init__(self, in_features: int, out_experts: list[int], hidden: int,
                 source: PredictorInput = "logits") -> None:
        super().__init__()
        if source not in INPUTS:
            raise BadInputError(f"routing predictor input must be one of {', '.join(INPUTS)}, got {source!r}")
        self.in_features, self.out_experts, self.hidden, self.source = in_features, list(out_experts), hidden, source
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, sum(out_experts))

    @property
    def in_experts(self) -> int:
        """Width of the input (kept for callers written when the input was always router logits)."""
        return self.in_features

    def features(self, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The predictor's input among the first MoE layer's (N, D) input and (N, E_0) router logits."""
        return hidden if self.source == "hidden" else logits

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = x.float()
        if self.source == "logits":  # the router's scale differs between models; its distribution does not
            x = torch.softmax(x, dim=-1)
        h = torch.relu(self.fc1(x))
        return list(self.fc2(h).split(self.out_experts, dim=-1))

    def meta(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_experts": self.out_experts, "hidden": self.hidden,
                "source": self.source}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> RoutingPredictor:
        """From `meta()`; checkpoints written before the hidden-state input say ``in_experts`` and no source."""
        width = meta.get("in_features", meta.get("in_experts"))
        source = cast(PredictorInput, meta.get("source", "logits"))
        return cls(int(width), [int(e) for e in meta["out_experts"]], int(meta["hidden"]), source)  # type: ignore[arg-type]
