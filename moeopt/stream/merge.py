"""`match` + `merge` in the streamed compile, one layer at a time.

`match`'s assignment program has one independent block per layer (`passes.match.solve_matching`), so each
layer's block is solved when the layer is reached, from its own routing statistics (or its experts'
weights, read one at a time). `merge` then changes the layer's slots (`passes.merge.plan_merge`: the
moderate slots go, each hot slot lists the experts routed to it) before any weight is touched; the merged
weights are made slot by slot when the quantizer (or a forward) asks for them (`SlotMaker`): the hot
expert and then each moderate expert read from the checkpoint, aligned and averaged
(`passes.merge.merge_weights`), so a layer holds one merged expert, one moderate expert and the
alignment's cost matrix at a time, never the layer's float table. The alignments found in the layer
sweep are kept in the work folder's layer state, so the parity sweep (and a resumed run) makes the same
merged weights again without solving them again.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moeopt.ir.table import SlotInfo
from moeopt.passes.importance import LayerStats
from moeopt.passes.match import Weights, capacity, layer_similarity, solve_matching
from moeopt.passes.merge import alignment, merge_weights, plan_merge
from moeopt.passes.prune import ExpertClasses
from moeopt.stream.plan import StreamPlan
from moeopt.stream.skeleton import StreamSkeleton


@dataclass
class MergeGroup:
    """One merged slot: its hot expert, the moderate experts folded into it, the merge weights (hot's
    first) and, once aligned, each moderate expert's neuron permutation (None: not aligned yet; an entry
    None: align=none)."""

    hot: int
    mods: list[int]
    weights: list[float]
    perms: list[list[int] | None] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"hot": self.hot, "mods": self.mods, "weights": self.weights, "perms": self.perms}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MergeGroup:
        return cls(int(d["hot"]), [int(m) for m in d["mods"]], [float(w) for w in d["weights"]], d["perms"])


def _weights(sk: StreamSkeleton, i: int, e: int) -> Weights:
    w_in, w_out = sk.expert(i, e)
    return w_in, w_out, None, None


def match_layer(sk: StreamSkeleton, i: int, plan: StreamPlan, cls: ExpertClasses,
                stats: LayerStats | None) -> dict[int, int]:
    """Layer i's moderate expert -> hot expert pairs, as `match` assigns them (its block of the program)."""
    assert plan.match is not None
    if not cls.moderate:
        return {}
    o = plan.match.opts
    spec = sk.model.layers[i].table.spec
    sim = layer_similarity(str(o["similarity"]), stats, cls.moderate, cls.hot, lambda e: _weights(sk, i, e), spec)
    rows, _, _ = solve_matching([sim], [capacity(int(o["capacity"]), len(cls.moderate), len(cls.hot))])
    return {cls.moderate[r]: cls.hot[c] for r, c in rows[0].items()}


def merge_layer(plan: StreamPlan, slots: list[SlotInfo], pairs: dict[int, int],
                stats: LayerStats | None) -> tuple[list[SlotInfo], dict[int, MergeGroup]]:
    """Layer i's slots after merging `pairs`, and the merged slots (by their new index) to make."""
    assert plan.merge is not None
    kind = str(plan.merge.opts["weight"])
    score = None
    if kind != "uniform":
        assert stats is not None
        score = stats.freq if kind == "freq" else stats.prob
    jobs, infos, keep = plan_merge(slots, pairs, score)
    new_index = {s: n for n, s in enumerate(keep)}
    groups = {new_index[hs]: MergeGroup(slots[hs].members[0], [slots[m].members[0] for m in ms], wts)
              for hs, ms, wts in jobs}
    return infos, groups


class SlotMaker:
    """make(s) -> (w_in, w_out) of slot s of layer i in float32, as the in-memory pipeline's table holds it
    after `merge`: a merged slot is made from its experts (aligned now, or by the stored permutations), any
    other slot is its own expert read from the checkpoint."""

    def __init__(self, sk: StreamSkeleton, i: int, slots: list[SlotInfo], groups: dict[int, MergeGroup],
                 align: str) -> None:
        self.sk, self.i, self.slots, self.groups, self.align = sk, i, slots, groups, align
        spec = sk.model.layers[i].table.spec
        self.inter, self.glu = spec.intermediate, spec.glu

    def __call__(self, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.groups.get(s)
        if g is None:
            return self.sk.expert(self.i, self.slots[s].members[0])
        hot = _weights(self.sk, self.i, g.hot)
        merged = merge_weights(hot, self._aligned(g, hot), g.weights, self.inter, self.glu, owned=True)
        return merged[0], merged[1]

    def _aligned(self, g: MergeGroup, hot: Weights) -> Iterator[tuple[Weights, np.ndarray | None]]:
        """Each moderate expert read one at a time and already permuted (its unpermuted copy released
        before the merge adds it: one moderate expert in memory, not two); the permutations found are kept."""
        found: list[list[int] | None] = []
        for k, m in enumerate(g.mods):
            mod = _weights(self.sk, self.i, m)
            if g.perms is not None:
                stored = g.perms[k]
                perm = None if stored is None else np.asarray(stored, dtype=np.int64)
            else:
                perm = alignment(hot, mod, self.inter, self.glu, self.align)
                found.append(None if perm is None else [int(x) for x in perm])
            if perm is not None:
                p = torch.as_tensor(perm)
                rows = torch.cat([p, p + self.inter]) if self.glu else p
                mod = (mod[0][rows], mod[1][:, p], None, None)
            yield mod, None
            del mod
        if g.perms is None:
            g.perms = found

    def state(self) -> list[dict[str, Any]]:
        """The merged slots for the work folder's layer state (their permutations found by then)."""
        return [{"slot": s, **g.to_dict()} for s, g in sorted(self.groups.items())]

    @classmethod
    def from_state(cls, sk: StreamSkeleton, i: int, slots: list[SlotInfo], state: list[dict[str, Any]],
                   align: str) -> SlotMaker:
        return cls(sk, i, slots, {int(d["slot"]): MergeGroup.from_dict(d) for d in state}, align)
