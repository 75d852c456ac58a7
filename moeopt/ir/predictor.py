"""The routing predictor: a 2-layer MLP from what the first MoE layer sees to the router logits of every
later MoE layer, and optional look-ahead heads that refine each layer's prediction one layer earlier.
It lives in the IR (saved with the checkpoint) because importance estimation, the lowering (prefetch
hints) and the runtime (expert prefetch) all use it.

Two inputs, both available once the first router has run:

- ``hidden`` (default): the first MoE layer's input, the (N, D) normalised hidden state its router reads.
- ``logits``: LiteMoE's original input, the softmax of the first router's (N, E_0) logits.

The router logits are a linear projection of the hidden state to E_0 dimensions, so they carry less of
what decides later layers' routing: on the reference model the hidden-state MLP's top-2 recall is
0.86/0.83/0.77 on layers 1-3 against 0.64/0.57/0.55 from the logits (bench/results/predictor.json).

A next-token table names the first layer's experts of the next step from the token the step chose
(`set_next_table`).

Look-ahead heads (``hidden`` only): for MoE layer j >= 2, a small MLP from layer j-1's input to layer j's
router logits. The first MLP names every later layer's experts as early as possible (all of them after
layer 0); a head names layer j's again, better, while layer j-1 computes, so the runtime can correct
its prefetches one layer ahead.

Far heads (``hidden`` only, at least 3 MoE layers): a small MLP per MoE layer j that names its experts
two layers ahead, from the input of layer (j - 2) mod L. For j = 0 and 1 that is layer L-2+j of the
*previous* step (position t's hidden state predicts position t+1's routing), so the next step's first
two layers get a read started while the current step's last layers compute; for j >= 3 it is layer
j-2 of the same step. Layer 2 has none: the first MLP already names it from layer 0's input. The
bench showed why they were tried (bench/results/offload-sweep/lead-time): an oracle that hints one
layer ahead gets only about half of the full oracle's gain on 2 cores, two layers ahead nearly all of
it. On the reference model the next step's heads name only about half of the true experts (recall@2
0.57 for layer 0, 0.52 for layer 1), and each wrong read costs a session build on the cores the decode
uses, so the predictor pass trains them only when asked (``far=N``; bench/results/offload-sweep/far).

The early head (``hidden`` only, with a next-token table): a small MLP from the last MoE layer's input
to the first layer's experts of the NEXT step, trained to say what the next-token table will name for
the token the LM head picks (argmax). It gives the next step's first layer a read started while the
last layer's experts and the LM head compute, about one expert load earlier than the table's own
answer, which exists only after the LM head. On the reference model (the predictor pass's held-out
calibration rows, stat ``early-recall``) it names 0.86 of the table's top-2 for the argmax token at 2
and 0.93 at 3; the table itself names 0.92 of the true top-2 given the token (``next-recall``).
"""

from __future__ import annotations

from typing import Any, Literal, cast

import torch
from torch import nn

from moeopt.errors import BadInputError

PredictorInput = Literal["hidden", "logits"]
INPUTS: tuple[PredictorInput, ...] = ("hidden", "logits")


def _mlp(width: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, out))


class RoutingPredictor(nn.Module):
    """(N, F) first-layer features -> list of (N, E_l) predicted logits for MoE layers 1..L-1.

    F is the hidden size for ``source="hidden"``, E_0 for ``source="logits"``; `features` picks the
    right one from a layer's (hidden, logits). With ``ahead_hidden > 0``, `ahead(j, x)` maps layer
    j-1's (N, D) input to layer j's (N, E_j) logits for j = 2..L-1.
    """

    def __init__(self, in_features: int, out_experts: list[int], hidden: int,
                 source: PredictorInput = "logits", ahead_hidden: int = 0, far_hidden: int = 0,
                 first_experts: int = 0, early_hidden: int = 0) -> None:
        super().__init__()
        if source not in INPUTS:
            raise BadInputError(f"routing predictor input must be one of {', '.join(INPUTS)}, got {source!r}")
        if ahead_hidden and source != "hidden":
            raise BadInputError("look-ahead heads read hidden states: they need input=hidden")
        self.in_features, self.out_experts, self.hidden, self.source = in_features, list(out_experts), hidden, source
        self.ahead_hidden = int(ahead_hidden)
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, sum(out_experts))
        heads = [_mlp(in_features, ahead_hidden, e) for e in out_experts[1:]] if ahead_hidden else []
        self.heads = nn.ModuleList(heads)  # heads[j - 2]: layer j-1's input -> layer j's logits
        if far_hidden and (source != "hidden" or len(out_experts) < 2 or first_experts < 1):
            raise BadInputError("far heads read hidden states of at least 3 MoE layers and need the first "
                                "layer's expert count: input=hidden, first_experts >= 1")
        self.far_hidden, self.first_experts = int(far_hidden), int(first_experts)
        experts = [self.first_experts, *self.out_experts]
        self.far = nn.ModuleList([_mlp(in_features, far_hidden, experts[j]) for j in self.far_layers])
        if early_hidden and (source != "hidden" or first_experts < 1):
            raise BadInputError("the early head reads the last MoE layer's hidden state and needs the first "
                                "layer's expert count: input=hidden, first_experts >= 1")
        self.early_hidden = int(early_hidden)
        self.early = _mlp(in_features, early_hidden, first_experts) if early_hidden else None
        self.next_table: torch.Tensor | None
        self.register_buffer("next_table", None)

    def set_next_table(self, table: torch.Tensor) -> None:
        """(V, k) int64: for each token id, the first MoE layer's experts most often chosen for it.

        Lowered after the LM head (ArgMax of the last logits, then a Gather), it names the next step's
        first-layer experts as soon as a step ends: the only layer the hidden-state predictor cannot
        reach, since its input does not exist before the next token does.
        """
        if table.dim() != 2 or table.shape[1] < 1:
            raise BadInputError(f"next-token expert table must be (vocab, k), got {tuple(table.shape)}")
        self.next_table = table.to(torch.int64)

    @property
    def ahead_layers(self) -> list[int]:
        """The MoE layers j that have a look-ahead head (read from layer j-1's input)."""
        return list(range(2, 2 + len(self.heads)))

    @property
    def far_layers(self) -> list[int]:
        """The MoE layers j that have a far head (none without ``far_hidden``)."""
        layers = len(self.out_experts) + 1
        return [j for j in range(layers) if j != 2] if self.far_hidden else []

    def far_source(self, layer: int) -> int:
        """The MoE layer whose input layer `layer`'s far head reads (of the previous step when it is
        not below `layer`)."""
        return (layer - 2) % (len(self.out_experts) + 1)

    def far_logits(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Layer `layer`'s (N, E) logits predicted two layers ahead from `far_source(layer)`'s (N, D) input."""
        fc1, fc2 = self.far_head(layer)
        return fc2(torch.relu(fc1(x.float())))  # type: ignore[no-any-return]

    def far_head(self, layer: int) -> tuple[nn.Linear, nn.Linear]:
        """The two linear layers of layer `layer`'s far head (a ReLU between them)."""
        if layer not in self.far_layers:
            raise BadInputError(f"the routing predictor has no far head for MoE layer {layer}")
        seq = self.far[self.far_layers.index(layer)]
        return seq[0], seq[2]  # type: ignore[index,return-value]

    def early_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The next step's (N, E_0) first-layer logits from the last MoE layer's (N, D) input (early head)."""
        fc1, fc2 = self.early_head()
        return fc2(torch.relu(fc1(x.float())))  # type: ignore[no-any-return]

    def early_head(self) -> tuple[nn.Linear, nn.Linear]:
        """The two linear layers of the early head (a ReLU between them)."""
        if self.early is None:
            raise BadInputError("the routing predictor has no early head (predictor{early=N} trains one)")
        return self.early[0], self.early[2]  # type: ignore[return-value]

    def features(self, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The predictor's input among the first MoE layer's (N, D) input and (N, E_0) router logits."""
        return hidden if self.source == "hidden" else logits

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = x.float()
        if self.source == "logits":  # the router's scale differs between models; its distribution does not
            x = torch.softmax(x, dim=-1)
        h = torch.relu(self.fc1(x))
        return list(self.fc2(h).split(self.out_experts, dim=-1))

    def ahead(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Layer `layer`'s (N, E) logits predicted from layer `layer - 1`'s (N, D) input."""
        fc1, fc2 = self.head(layer)
        return fc2(torch.relu(fc1(x.float())))  # type: ignore[no-any-return]

    def head(self, layer: int) -> tuple[nn.Linear, nn.Linear]:
        """The two linear layers of layer `layer`'s look-ahead head (a ReLU between them)."""
        if layer not in self.ahead_layers:
            raise BadInputError(f"the routing predictor has no look-ahead head for MoE layer {layer}")
        seq = self.heads[layer - 2]
        return seq[0], seq[2]  # type: ignore[index,return-value]

    def meta(self) -> dict[str, Any]:
        table = None if self.next_table is None else list(self.next_table.shape)
        return {"in_features": self.in_features, "out_experts": self.out_experts, "hidden": self.hidden,
                "source": self.source, "ahead_hidden": self.ahead_hidden, "far_hidden": self.far_hidden,
                "first_experts": self.first_experts, "early_hidden": self.early_hidden, "next_table": table}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> RoutingPredictor:
        """From `meta()`; checkpoints written before the hidden-state input say ``in_experts`` and no source."""
        width = meta.get("in_features", meta.get("in_experts"))
        source = cast(PredictorInput, meta.get("source", "logits"))
        pred = cls(int(width), [int(e) for e in meta["out_experts"]], int(meta["hidden"]), source,  # type: ignore[arg-type]
                   int(meta.get("ahead_hidden", 0)), int(meta.get("far_hidden", 0)),
                   int(meta.get("first_experts", 0)), int(meta.get("early_hidden", 0)))
        if meta.get("next_table"):
            pred.set_next_table(torch.zeros([int(n) for n in meta["next_table"]], dtype=torch.int64))
        return pred
