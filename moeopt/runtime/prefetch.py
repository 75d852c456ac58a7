"""Prefetchers for the expert cache, and a recorder of routing traces.

A prefetcher is attached to an `ExpertCache` and requests loads with ``cache.prefetch(layer, slots)``:

- `GraphHints`: acts on the driver's ``hint`` calls, i.e. the routing predictor lowered into the graph
  (its predicted experts of later layers are extra graph outputs).
- `StatsTable`: EdgeMoE's statistics, ``P(slot b at layer i+1 | slot a at layer i)`` counted per token,
  learned online from ``observe`` (and/or fitted on a recorded trace); after layer i it hints the most
  likely cold experts of layer i+1.
- `Oracle`: replays a routing trace recorded from an identical run and hints the true cold experts of
  the next `depth` layers: the upper bound of any predictor.

A trace is a list per step of ``(layer, cold slots used)`` in layer order; `Recorder` wraps any
`ExpertSource` and writes one while delegating to it. A step starts when a layer comes that is lower
than the highest one seen in the current step (the driver observes every MoE layer each step, so a
step whose first layers use no cold expert still counts). A prefetcher serves one cache at a time:
``attach`` restarts its step count and keeps what it learned.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from moeopt.errors import BadInputError
from moeopt.runtime.offload_format import ExpertSource, OffloadIndex
from moeopt.runtime.packed_frames import PackedExpert

if TYPE_CHECKING:
    from moeopt.runtime.expert_cache import ExpertCache

Trace = list[list[tuple[int, tuple[int, ...]]]]  # per step, (layer, cold slots used) in layer order


class Prefetcher(Protocol):
    """What `ExpertCache` asks of a prefetcher (the classes below)."""

    graph_hints: bool  # True: the driver's `hint` calls (graph predictor outputs) are acted on
    width: int | None  # with graph_hints: the first `width` experts of each token's hint (None: all)

    def attach(self, cache: ExpertCache) -> None:
        """Called once by the cache; a prefetcher requests loads with ``cache.prefetch``."""
        ...

    def observe(self, layer: int, logits: np.ndarray) -> None:
        """The layer's router logits of the step just run."""
        ...


def save_trace(trace: Trace, path: str | Path) -> None:
    """Write a trace as JSON."""
    Path(path).write_text(json.dumps([[[layer, list(slots)] for layer, slots in step] for step in trace]))


def load_trace(path: str | Path) -> Trace:
    """Read a trace written by `save_trace`."""
    return [[(int(layer), tuple(int(s) for s in slots)) for layer, slots in step]
            for step in json.loads(Path(path).read_text())]


class _StepClock:
    """Counts steps from the layer order of calls: a layer below the step's highest one starts a step."""

    def __init__(self) -> None:
        self.step, self.top = 0, -1

    def tick(self, layer: int) -> int:
        if layer < self.top:
            self.step, self.top = self.step + 1, layer
        self.top = max(self.top, layer)
        return self.step


class GraphHints:
    """Prefetch what the in-graph routing predictor names (the driver passes its outputs to ``hint``).

    Args:
        depth: act only on hints for the next `depth` MoE layers (1: the layer after the one about to
            run); None: every hint. Hints further ahead come earlier but are less accurate, and under a
            small budget their frames are taken from experts needed sooner; the look-ahead heads name
            each layer again one layer ahead, so depth 1 still prefetches every layer.
        width: prefetch the first `width` experts of each token's hint (they come best first; the
            artifact names ``prefetch.top`` per token: the router's top_k unless lowered with a larger
            ``prefetch-top``); None: all.
            Wider hints miss less and read more.
        min_precision: stop prefetching once `warmup` prefetches have been issued and fewer than this
            share of them were used (``prefetch_used / prefetch_issued``); None: never stop. A prefetch
            that is never used costs what a miss costs (a read, and building its session) and takes a
            frame: on the ~1B random model in a memory cgroup at half the 4-bit model's size, 18% of the
            predictor's prefetches were used and the budgeted cache decoded slower than on-demand
            (`bench/offload_large.py`). Once stopped it stays stopped (no prefetch, no new evidence).
        warmup: prefetches issued before `min_precision` is checked.
    """

    graph_hints = True

    def __init__(self, depth: int | None = None, width: int | None = None, *,
                 min_precision: float | None = None, warmup: int = 64) -> None:
        if depth is not None and depth < 1:
            raise BadInputError(f"prefetch depth must be at least 1, got {depth}")
        if width is not None and width < 1:
            raise BadInputError(f"prefetch width must be at least 1, got {width}")
        if min_precision is not None and not 0.0 <= min_precision <= 1.0:
            raise BadInputError(f"prefetch min_precision must be in [0, 1], got {min_precision}")
        if warmup < 1:
            raise BadInputError(f"prefetch warmup must be at least 1, got {warmup}")
        self.depth, self.width = depth, width
        self.min_precision, self.warmup = min_precision, warmup
        self.stopped = False

    def wanted(self, issued: int, used: int) -> bool:
        """Whether to act on hints, given the cache's prefetches issued and used so far."""
        if self.min_precision is not None and not self.stopped and issued >= self.warmup:
            self.stopped = used < self.min_precision * issued
        return not self.stopped

    def attach(self, cache: ExpertCache) -> None:
        pass

    def observe(self, layer: int, logits: np.ndarray) -> None:
        pass


class StatsTable:
    """EdgeMoE's statistical predictor: after layer i, hint the cold experts of layer i+1 with the highest
    ``sum over tokens and chosen a of P(b | a)``.

    Args:
        top_m: experts hinted per token (default: layer i+1's top_k).
        learn: keep counting online from ``observe`` (off: use only what `fit` learned).
    """

    graph_hints = False
    width: int | None = None

    def __init__(self, top_m: int | None = None, learn: bool = True) -> None:
        self.top_m = top_m
        self.learn = learn
        self.counts: list[np.ndarray] = []  # per layer i, (S_i, S_{i+1}) transitions seen
        self._cache: ExpertCache | None = None
        self._prev: tuple[int, int, np.ndarray] | None = None  # (step, layer, (N, k) slots)
        self._clock = _StepClock()

    def attach(self, cache: ExpertCache) -> None:
        self._cache, self._prev, self._clock = cache, None, _StepClock()
        self._grow(list(cache.slots.num_slots))

    def _grow(self, num_slots: list[int]) -> None:
        """Make room for `num_slots` slots per layer, keeping the counts so far."""
        while len(self.counts) < len(num_slots) - 1:
            self.counts.append(np.zeros((0, 0)))
        for i, table in enumerate(self.counts):
            rows, cols = max(table.shape[0], num_slots[i]), max(table.shape[1], num_slots[i + 1])
            if table.shape != (rows, cols):
                self.counts[i] = np.pad(table, ((0, rows - table.shape[0]), (0, cols - table.shape[1])))

    def fit(self, trace: Trace) -> StatsTable:
        """Count transitions between the cold slots of consecutive layers in a recorded trace."""
        layers = 1 + max((la for step in trace for la, _ in step), default=0)
        width = [0] * layers
        for step in trace:
            for la, slots in step:
                width[la] = max(width[la], 1 + max(slots, default=-1))
        self._grow(width)
        for step in trace:
            for (la, sa), (lb, sb) in itertools.pairwise(step):
                if lb == la + 1 and la < len(self.counts):
                    for a in sa:
                        self.counts[la][a, list(sb)] += 1
        return self

    def observe(self, layer: int, logits: np.ndarray) -> None:
        cache = self._cache
        if cache is None:
            return
        step = self._clock.tick(layer)
        chosen = cache.slots.route(layer, logits)  # (N, k)
        if self.learn and self._prev is not None and self._prev[:2] == (step, layer - 1):
            prev = self._prev[2]  # (N, k) at layer - 1
            if prev.shape[0] == chosen.shape[0]:  # every (a, b) pair of each token
                np.add.at(self.counts[layer - 1], (prev[:, :, None], chosen[:, None, :]), 1)
        self._prev = (step, layer, chosen)
        if layer >= len(self.counts):
            return
        table = self.counts[layer]  # (S_i, S_{i+1})
        probs = table / np.maximum(table.sum(axis=1, keepdims=True), 1)  # rows: P(b | a)
        score = probs[chosen.reshape(-1)].sum(axis=0)  # (S_{i+1},)
        cold = np.asarray(cache.index.cold(layer + 1), dtype=np.int64)
        if cold.size == 0:
            return
        m = (self.top_m or cache.index.top_k[layer + 1]) * chosen.shape[0]
        order = cold[np.argsort(-score[cold], kind="stable")][:m]
        picks = [int(s) for s in order if score[s] > 0]
        if picks:
            cache.prefetch(layer + 1, picks)


class Oracle:
    """Replay a recorded trace: after layer i of step t, hint the true cold experts of the next `depth`
    layers (into the next step where the model wraps around); the first `depth` layers of step 0 are
    hinted when it attaches.

    With `causal`, the next step's layers are hinted only after the step's last layer, when its token is
    (nearly) known: the most any predictor can know that, like every real one, does not see the next
    token before it is chosen. It bounds what prefetching from the routing of the current token can reach.
    """

    graph_hints = False
    width: int | None = None

    def __init__(self, trace: Trace, depth: int = 1, causal: bool = False) -> None:
        self.trace = trace
        self.depth = max(1, depth)
        self.causal = causal
        self._cache: ExpertCache | None = None
        self._clock = _StepClock()
        self._layers = 1

    def _hint(self, lo: int, hi: int) -> None:
        """Hint every traced entry at global layer position in [lo, hi] (position = step * L + layer)."""
        assert self._cache is not None
        L = self._layers
        for pos in range(max(lo, 0), hi + 1):
            t, layer = divmod(pos, L)
            if t < len(self.trace):
                for la, slots in self.trace[t]:
                    if la == layer:
                        self._cache.prefetch(la, slots)

    def attach(self, cache: ExpertCache) -> None:
        self._cache, self._clock = cache, _StepClock()
        self._layers = len(cache.index.top_k)
        self._hint(0, self.depth - 1)

    def observe(self, layer: int, logits: np.ndarray) -> None:
        if self._cache is None:
            return
        step = self._clock.tick(layer)
        pos = step * self._layers + layer
        hi = pos + self.depth
        if self.causal and layer < self._layers - 1:
            hi = min(hi, (step + 1) * self._layers - 1)  # not past this step's last layer
        self._hint(pos + 1, hi)


class Recorder:
    """An `ExpertSource` that records the routing trace (cold slots acquired per layer) of a run while
    delegating everything to `source`."""

    def __init__(self, source: ExpertSource) -> None:
        self.source = source
        self.index: OffloadIndex = source.index
        self.packed = source.packed
        self.hint_width = source.hint_width
        self.trace: Trace = []
        self._clock = _StepClock()

    def _at(self, layer: int) -> list[tuple[int, tuple[int, ...]]]:
        step = self._clock.tick(layer)
        while len(self.trace) <= step:
            self.trace.append([])
        return self.trace[step]

    def frames(self, fmt: str) -> int:
        return self.source.frames(fmt)

    def arrays(self, fmt: str) -> dict[str, np.ndarray]:
        return self.source.arrays(fmt)

    def expert(self, fmt: str, frame: int) -> PackedExpert:
        return self.source.expert(fmt, frame)

    def acquire(self, layer: int, slots: Sequence[int]) -> dict[int, int]:
        entries = self._at(layer)
        new = tuple(int(s) for s in slots)
        if entries and entries[-1][0] == layer:  # one layer acquired in several chunks
            entries[-1] = (layer, tuple(dict.fromkeys(entries[-1][1] + new)))
        else:
            entries.append((layer, new))
        return self.source.acquire(layer, slots)

    def release(self) -> None:
        self.source.release()

    def hint(self, layer: int, slots: Sequence[int]) -> None:
        self.source.hint(layer, slots)

    def routed(self, layer: int, slots: Sequence[int]) -> None:
        self.source.routed(layer, slots)

    def keep_mask(self, layer: int) -> np.ndarray | None:
        return self.source.keep_mask(layer)

    def observe(self, layer: int, logits: np.ndarray) -> None:
        self._at(layer)
        self.source.observe(layer, logits)
