"""Replacement policies of the expert cache, and the slot map that ties router logits to slots.

A policy sees every access and load of a cold expert ``(layer, slot)`` and, when the cache needs a
frame, picks the victim among the frames it may evict (never a pinned or loading one: the cache
filters those out first). Policies are only called with the cache's lock held, so they keep plain state.

- ``lru``: least recently used (an access or a load touches the expert).
- ``fifo``: first in, first out (only loads count).
- ``lfu``: least frequently used, counts kept across evictions (ties: least recent).
- ``edgemoe``: EdgeMoE's rule: the lowest score ``freq_share + proximity``, where ``freq_share`` is the
  expert's share of its layer's accesses and ``proximity = 1 - d / L`` with ``d`` (1..L) the number of
  layers until the expert's layer runs again; experts of the layers just passed go first, those of the
  layer running now (or just run) before all others: decoding cycles through the layers, so they are
  needed last.
- ``committee``: SwapMoE: the lowest decayed router importance (softmax mass) goes first; the cache also
  masks the router to the resident committee and refreshes it asynchronously (see `ExpertCache`).
- ``on-demand`` (or ``none``): the baseline of EdgeMoE's comparison: LRU replacement, no prefetching at all.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from moeopt.errors import BadInputError
from moeopt.runtime.offload_format import OffloadIndex

Key = tuple[int, int]  # (MoE layer, slot)

POLICIES = ("lru", "fifo", "lfu", "edgemoe", "committee", "on-demand", "none")
DEFAULT_POLICY = "lfu"  # `moeopt run` without a plan: under the graph predictor's prefetches LFU evicts the
# mispredicted experts (read, never used) first; it decoded fastest of LRU, LFU and EdgeMoE's eviction on
# greedy text and no slower than LRU on sampled text (bench/results/offload-sweep/policy, sampled)


class SlotMap:
    """Per MoE layer, the slot of each original expert (-1 where pruned), to read router logits as slots.

    The router scores the E original experts; after pruning and merging, expert ``e`` runs as slot
    ``slot_of[e]`` (several experts may share one). With no table the map is the identity.
    """

    def __init__(self, index: OffloadIndex, slot_of: Sequence[Sequence[int]] | None = None) -> None:
        layers = len(index.top_k)
        if slot_of is None:
            width = [1 + max([*index.hot[i], *index.cold(i), -1]) for i in range(layers)]
            slot_of = [list(range(w)) for w in width]
        if len(slot_of) != layers:
            raise BadInputError(f"slot_of has {len(slot_of)} layers but the offload index has {layers}")
        self.slot_of = tuple(np.asarray(s, dtype=np.int64) for s in slot_of)  # per layer (E,)
        self.top_k = index.top_k
        self.num_slots = tuple(int(max(int(s.max()) + 1, 1 + max([*index.hot[i], *index.cold(i), -1])))
                               for i, s in enumerate(self.slot_of))

    def kept(self, layer: int) -> np.ndarray:
        """(E,) bool: the experts the model may route to (not pruned)."""
        return self.slot_of[layer] >= 0

    def route(self, layer: int, logits: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """The slots each token is routed to: top-k of the kept (and `mask`-allowed) experts, (N, k)."""
        logits = np.asarray(logits, dtype=np.float64).reshape(-1, logits.shape[-1])  # (N, E)
        allow = self.kept(layer) if mask is None else self.kept(layer) & mask  # (E,)
        k = min(self.top_k[layer], int(allow.sum()))
        scored = np.where(allow[None, :], logits, -np.inf)  # (N, E)
        experts = np.argsort(-scored, axis=1, kind="stable")[:, :k]  # (N, k)
        return self.slot_of[layer][experts]  # (N, k)

    def mass(self, layer: int, logits: np.ndarray) -> np.ndarray:
        """Softmax router mass per slot, averaged over tokens, (S,)."""
        logits = np.asarray(logits, dtype=np.float64).reshape(-1, logits.shape[-1])  # (N, E)
        kept = self.kept(layer)
        z = np.where(kept[None, :], logits, -np.inf)
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)  # (N, E)
        out = np.zeros(self.num_slots[layer])
        np.add.at(out, self.slot_of[layer][kept], p[:, kept].mean(axis=0))
        return out  # (S,)


def layers_until(layer: int, current: int, layers: int) -> int:
    """How many layers run, counting from `current` (the layer running or just run), until `layer` runs
    again: 1 for the next layer, `layers` for `current` itself (decoding cycles through the layers)."""
    return (layer - current - 1) % layers + 1


class CachePolicy(Protocol):
    """What the cache asks of a replacement policy (always with the cache's lock held)."""

    name: str

    def on_access(self, key: Key) -> None:
        """`key` was acquired (resident or being loaded)."""
        ...

    def on_load(self, key: Key) -> None:
        """`key` finished loading into a frame."""
        ...

    def victim(self, candidates: Sequence[Key], current_layer: int) -> Key:
        """The resident expert to evict among `candidates`; `current_layer` is the layer about to run."""
        ...


class LRUPolicy:
    """Least recently used: an access or a load touches the expert."""

    name = "lru"

    def __init__(self) -> None:
        self._clock = itertools.count()
        self.last: dict[Key, int] = {}

    def on_access(self, key: Key) -> None:
        self.last[key] = next(self._clock)

    def on_load(self, key: Key) -> None:
        self.last[key] = next(self._clock)

    def victim(self, candidates: Sequence[Key], current_layer: int) -> Key:
        return min(candidates, key=lambda c: self.last.get(c, -1))


class FIFOPolicy(LRUPolicy):
    """First in, first out: only loads count, accesses do not reorder."""

    name = "fifo"

    def on_access(self, key: Key) -> None:
        pass


class LFUPolicy(LRUPolicy):
    """Least frequently used; counts persist across evictions, ties go to the least recent."""

    name = "lfu"

    def __init__(self) -> None:
        super().__init__()
        self.freq: dict[Key, int] = {}

    def on_access(self, key: Key) -> None:
        super().on_access(key)
        self.freq[key] = self.freq.get(key, 0) + 1

    def victim(self, candidates: Sequence[Key], current_layer: int) -> Key:
        return min(candidates, key=lambda c: (self.freq.get(c, 0), self.last.get(c, -1)))


class EdgeMoEPolicy(LFUPolicy):
    """EdgeMoE: evict the lowest ``freq_share + proximity`` (frequency within the layer, layer distance)."""

    name = "edgemoe"

    def __init__(self, num_layers: int, distance_weight: float = 1.0) -> None:
        super().__init__()
        self.num_layers = max(1, num_layers)
        self.distance_weight = distance_weight
        self.layer_total: dict[int, int] = {}

    def on_access(self, key: Key) -> None:
        super().on_access(key)
        self.layer_total[key[0]] = self.layer_total.get(key[0], 0) + 1

    def score(self, key: Key, current_layer: int) -> float:
        """Higher is kept longer: the expert's share of its layer's accesses plus its layer's proximity."""
        share = self.freq.get(key, 0) / max(1, self.layer_total.get(key[0], 0))
        # the current layer's experts are a whole step away (what it needs now is pinned)
        d = layers_until(key[0], current_layer, self.num_layers)
        return share + self.distance_weight * (1.0 - d / self.num_layers)

    def victim(self, candidates: Sequence[Key], current_layer: int) -> Key:
        return min(candidates, key=lambda c: (self.score(c, current_layer), self.last.get(c, -1)))


class CommitteePolicy(LRUPolicy):
    """SwapMoE: experts ranked by decayed router importance; the least important resident one goes first."""

    name = "committee"

    def __init__(self, slots: SlotMap, decay: float = 0.9) -> None:
        super().__init__()
        self.slots = slots
        self.decay = decay
        self.importance = [np.zeros(n) for n in slots.num_slots]  # per layer (S,)

    def update(self, layer: int, logits: np.ndarray) -> None:
        """Fold one step's router mass into the layer's importance."""
        self.importance[layer] = self.decay * self.importance[layer] + self.slots.mass(layer, logits)

    def value(self, key: Key) -> float:
        imp = self.importance[key[0]]
        return float(imp[key[1]]) if key[1] < imp.shape[0] else 0.0

    def victim(self, candidates: Sequence[Key], current_layer: int) -> Key:
        return min(candidates, key=lambda c: (self.value(c), self.last.get(c, -1)))

    def ranked(self, layer: int, slots: Sequence[int]) -> list[int]:
        """`slots` of `layer`, most important first (stable for ties)."""
        return sorted(slots, key=lambda s: -self.value((layer, s)))

    def committee(self, index: OffloadIndex, frames: dict[str, int]) -> list[Key]:
        """The cold experts the committee should hold, most wanted first, at most `frames` per format.

        Each layer first gets the cold experts it needs to reach top_k allowed experts beside its hot
        ones, then the remaining frames go to the most important cold experts of any layer.
        """
        left = dict(frames)
        chosen: list[Key] = []
        ranked = {i: self.ranked(i, index.cold(i)) for i in range(len(index.top_k))}
        for i, cold in ranked.items():
            need = max(0, index.top_k[i] - len(index.hot[i]))
            for s in cold[:need]:
                f = index.experts[(i, s)].format
                if left[f] > 0:
                    chosen.append((i, s))
                    left[f] -= 1
        rest = sorted(((i, s) for i, cold in ranked.items() for s in cold if (i, s) not in chosen),
                      key=lambda k: -self.value(k))
        for key in rest:
            f = index.experts[key].format
            if left[f] > 0:
                chosen.append(key)
                left[f] -= 1
        return chosen


def make_policy(name: str, index: OffloadIndex, slots: SlotMap, decay: float = 0.9) -> CachePolicy:
    """The policy called `name` (one of `POLICIES`)."""
    if name in ("lru", "on-demand", "none"):
        return LRUPolicy()
    if name == "fifo":
        return FIFOPolicy()
    if name == "lfu":
        return LFUPolicy()
    if name == "edgemoe":
        return EdgeMoEPolicy(len(index.top_k))
    if name == "committee":
        return CommitteePolicy(slots, decay)
    raise BadInputError(f"unknown cache policy '{name}'; choose one of {', '.join(POLICIES)}")
