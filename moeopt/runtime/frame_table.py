"""The expert cache's frame table: which cold expert each pool frame holds, its state, its pins; counters.

Not thread-safe by itself: `ExpertCache` calls it with its lock held. A frame is EMPTY, QUEUED (reserved
for a prefetch whose read has not started), LOADING (a read is writing it) or READY. Every reassignment
bumps the frame's generation, so a queued read of an expert that lost its frame is skipped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from moeopt.errors import BadInputError
from moeopt.runtime.cache_policies import CachePolicy, Key
from moeopt.runtime.offload_format import OffloadIndex
from moeopt.runtime.packed_frames import FramePacker, PackedExpert, frame_pool, frame_views

EMPTY, QUEUED, LOADING, READY = range(4)
Spot = tuple[str, int]  # (format, frame)
Job = tuple[str, int, int, Key]  # a read: format, frame, generation, expert


@dataclass
class LayerCounters:
    """One MoE layer's share of `CacheCounters`: where the misses and the waiting come from."""

    acquired: int = 0
    hinted_acquired: int = 0
    misses: int = 0
    stall_seconds: float = 0.0


@dataclass
class CacheCounters:
    """What the cache did: hits, misses, bytes read, time acquire waited, prefetch usefulness; ``layers``
    splits acquisitions, misses and stall by MoE layer."""

    hits: int = 0  # acquired experts already resident or being prefetched
    misses: int = 0  # acquired experts that acquire had to read itself
    loads: int = 0  # reads completed (misses + prefetches + committee swaps)
    bytes_read: int = 0
    stall_seconds: float = 0.0  # time acquire (and a committee warm-up) blocked on reads
    prefetch_issued: int = 0
    prefetch_used: int = 0  # prefetched experts acquired before eviction
    prefetch_dropped: int = 0  # hints with no evictable frame, or cancelled before their read began
    evictions: int = 0
    acquired: int = 0
    hinted_acquired: int = 0  # acquired experts that had been hinted beforehand
    layers: dict[int, LayerCounters] = field(default_factory=dict)

    def layer(self, index: int) -> LayerCounters:
        """The counters of MoE layer `index` (made on first use; every acquire asks, so no default is built
        when the layer has its counters already)."""
        found = self.layers.get(index)
        if found is None:
            found = self.layers[index] = LayerCounters()
        return found

    @property
    def recall(self) -> float:
        """Share of acquired experts that had been hinted beforehand (the predictor's recall)."""
        return self.hinted_acquired / self.acquired if self.acquired else 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the totals, ``recall``, and ``layers`` as {"i": {...}} in layer order."""
        out = {**asdict(self), "recall": self.recall}
        out["layers"] = {str(i): asdict(self.layers[i]) for i in sorted(self.layers)}
        return out


@dataclass
class Frame:
    key: Key | None = None
    state: int = EMPTY
    pins: int = 0
    gen: int = 0  # bumped on every reassignment
    prefetched: bool = False  # loaded by a prefetch and not acquired since


class FrameTable:
    """Pools (one per format, `frames_of` frames each) and the state of every frame.

    With a `packer`, each ready frame also has its `PackedExpert`, and the pools hold only the parts the
    packed session reads at run time (the others are read into the packer's staging buffers).
    """

    def __init__(self, index: OffloadIndex, frames_of: dict[str, int], policy: CachePolicy,
                 counters: CacheCounters, packer: FramePacker | None = None) -> None:
        self.index, self.frames_of, self.policy, self.counters = index, frames_of, policy, counters
        self.packer = packer
        self.pools = {f: frame_pool(index.formats[f], n, packer) for f, n in frames_of.items()}
        self.packed: dict[str, list[PackedExpert | None]] = {f: [None] * n for f, n in frames_of.items()}
        self.frames = {f: [Frame() for _ in range(n)] for f, n in frames_of.items()}
        self.where: dict[Key, Spot] = {}

    def frame(self, spot: Spot) -> Frame:
        return self.frames[spot[0]][spot[1]]

    def is_ready(self, key: Key) -> bool:
        spot = self.where.get(key)
        return spot is not None and self.frame(spot).state == READY

    def resident(self) -> set[Key]:
        return {k for k in self.where if self.is_ready(k)}

    def job(self, spot: Spot, key: Key) -> Job:
        return spot[0], spot[1], self.frame(spot).gen, key

    def views(self, spot: Spot) -> list[np.ndarray]:
        """Where a read of the frame lands, one array per part in format order: the frame's slice of
        each pool array, or (with a packer) this thread's staging buffer for a part ORT copies."""
        fmt, idx = spot
        return frame_views(self.index.formats[fmt], self.pools[fmt], idx, self.packer)

    def clear(self, spot: Spot, key: Key) -> None:
        """Empty a frame whose read will not happen or failed."""
        fr = self.frame(spot)
        fr.state, fr.key, fr.prefetched = EMPTY, None, False
        self.packed[spot[0]][spot[1]] = None
        self.where.pop(key, None)

    def unpin(self, spots: list[Spot]) -> None:
        for spot in spots:
            self.frame(spot).pins -= 1

    def reserve(self, key: Key, avoid: set[Key], layer: int, *, cancel_queued: bool = False,
                must: bool = False) -> Spot | None:
        """A frame for `key` (now LOADING): an empty one, else the policy's victim among the ready,
        unpinned frames not in `avoid` (with `cancel_queued`, else a queued prefetch); None if none.

        Raises:
            BadInputError: with `must`, when every frame is pinned and no read is in flight.
        """
        fmt = self.index.experts[key].format
        table = self.frames[fmt]
        idx = next((i for i, f in enumerate(table) if f.state == EMPTY), None)
        if idx is None:
            ready = {f.key: i for i, f in enumerate(table)
                     if f.state == READY and f.pins == 0 and f.key is not None and f.key not in avoid}
            if not ready and cancel_queued:
                ready = {f.key: i for i, f in enumerate(table) if f.state == QUEUED and f.pins == 0
                         and f.key is not None}
                self.counters.prefetch_dropped += bool(ready)
            if not ready:
                if must and not any(f.state in (QUEUED, LOADING) and f.pins == 0 for f in table):
                    raise BadInputError(f"all {len(table)} frames of format {fmt} are pinned; release() "
                                        "before acquiring more")
                return None
            old = self.policy.victim(sorted(ready), layer)
            idx = ready[old]
            del self.where[old]
            self.counters.evictions += 1
        fr = table[idx]
        fr.key, fr.gen, fr.prefetched, fr.state = key, fr.gen + 1, False, LOADING
        self.packed[fmt][idx] = None  # frees the old expert's packed weights before the new one is built
        self.where[key] = (fmt, idx)
        return fmt, idx
