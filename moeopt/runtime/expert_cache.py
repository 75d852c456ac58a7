"""A byte-budgeted cache of cold experts: the `ExpertSource` that serves an offload artifact in a budget.

The budget buys frames in one pool per format (`frames_for_budget`). A frame table says which
``(layer, slot)`` each frame holds, its state (empty, queued for a prefetch, loading, ready) and its pin
count; one lock and one condition variable guard it. ``acquire`` pins what is resident, waits for reads
in flight and reads misses itself (also a hinted read that has not started yet, rather than wait behind
the queue); ``hint``/``prefetch`` reserve a frame at once and queue the read on the I/O thread(s),
dropping the hint when no frame may be evicted. Eviction never takes a pinned or loading frame; a
prefetch never takes what the running layer acquired, another hinted expert not used yet, or an expert
a router mask of this step allows. A read error on an I/O thread is kept and raised by the next
``acquire`` (never a hang).

With ``policy="committee"`` (SwapMoE) ``keep_mask(layer)`` masks the router to the layer's hot experts
and its resident cold ones (reading the most important cold experts first if that leaves fewer than
top_k), so routing never misses; ``observe`` accumulates router importance and every `refresh_every`
steps the I/O thread swaps the resident set toward the most important experts, a layer at a time as
each layer's mask is released.
"""

from __future__ import annotations

import atexit
import itertools
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from moeopt.errors import BadInputError
from moeopt.runtime.cache_policies import CommitteePolicy, Key, SlotMap, layers_until, make_policy
from moeopt.runtime.expert_store import ExpertStore, SlowStorage
from moeopt.runtime.frame_table import LOADING, QUEUED, READY, CacheCounters, FrameTable, Job, Spot
from moeopt.runtime.manifest import read_manifest
from moeopt.runtime.offload_format import OffloadIndex, frames_for_budget
from moeopt.runtime.packed_frames import FramePacker, PackedExpert

if TYPE_CHECKING:
    from moeopt.runtime.prefetch import Prefetcher

__all__ = ["CacheCounters", "ExpertCache", "ExpertStore", "cache_source"]

@dataclass
class _Step:
    layer: int = -1  # the layer running now (last acquired or masked)
    protected: set[Key] = field(default_factory=set)  # what that layer acquired or was allowed


class ExpertCache:
    """Cold experts in frames within `budget_bytes`, with a replacement policy, loads on I/O threads and
    optional prefetching; implements `ExpertSource`.

    Args:
        folder: the artifact folder holding ``index.file``.
        index: the manifest's offload index.
        budget_bytes: bytes of expert frames (at least ``index.min_budget()``).
        policy: one of `cache_policies.POLICIES`; ``on-demand`` is LRU with every hint ignored.
        prefetcher: None for no prefetching, else `GraphHints`, `StatsTable`, `Oracle`, ...
        io_threads: threads that run prefetch reads and committee swaps.
        slot_of: per MoE layer, each original expert's slot (-1 pruned), from the manifest; identity if None.
        refresh_every: steps between committee refreshes (``committee`` only).
        decay: importance decay per step (``committee`` only).
        packer: build a prepacked session for every loaded expert (`packed_frames`), on the thread
            that read it; None keeps raw pools for the cold graphs.
        storage: a slower device to emulate (`SlowStorage`, benchmarks); None reads at this machine's speed.
        read_threads: the misses of one ``acquire`` (a layer's chosen experts) are read and built this many
            at a time, the calling thread included: a read is a preadv and a build mostly ORT's prepacking,
            both outside Python's GIL, so two misses on two cores cost about one (1: one after another).
        page_cache: leave the expert file's pages in the page cache after a read (False: drop each record's
            pages once read, so an expert is not in memory twice; see `ExpertStore`).
    """

    def __init__(self, folder: str | Path, index: OffloadIndex, budget_bytes: int, policy: str = "lru",
                 prefetcher: Prefetcher | None = None, io_threads: int = 1, *,
                 slot_of: Sequence[Sequence[int]] | None = None, refresh_every: int = 8,
                 decay: float = 0.9, prior: Sequence[Sequence[float]] | None = None,
                 packer: FramePacker | None = None, storage: SlowStorage | None = None,
                 page_cache: bool = True, read_threads: int = 2) -> None:
        if policy in ("on-demand", "none") and prefetcher is not None:
            raise BadInputError("the on-demand cache does no prefetching; pass no prefetcher or another policy")
        self.index = index
        frames = frames_for_budget(index, budget_bytes)
        self.slots = SlotMap(index, slot_of)
        self.policy_name = policy
        self.policy = make_policy(policy, index, self.slots, decay)
        self.counters = CacheCounters()
        self._t = FrameTable(index, frames, self.policy, self.counters, packer)
        self.packer = packer
        self.packed: bool = packer is not None
        # the last of what can fail before the threads start
        self.store = ExpertStore(folder, index, storage, page_cache=page_cache)
        self._cold = [index.cold(i) for i in range(len(index.top_k))]
        self._pinned: list[Spot] = []
        self._hinted: set[Key] = set()
        self._step = _Step()
        self._committed: dict[int, set[Key]] = {}  # per layer, the cold experts its last keep_mask allowed
        self._cond = threading.Condition(threading.Lock())
        self._error: BadInputError | None = None
        self._closed = False
        self.refresh_every = max(1, refresh_every)
        self._obs_layer, self._steps = -1, 0
        self._swap_wanted = self._swap_queued = False
        # I/O work in order of need: (layer position the read is needed at, order queued, job); see `_put`
        self._jobs: queue.PriorityQueue[tuple[int, int, Job | Callable[[], None] | None]] = queue.PriorityQueue()
        self._queued = itertools.count()
        self._position = 0  # layers entered so far (the running layer's position in the decode)
        self._threads = [threading.Thread(target=self._worker, name=f"moeopt-io-{i}", daemon=True)
                         for i in range(max(1, io_threads))]
        self._miss_pool = (ThreadPoolExecutor(read_threads - 1, thread_name_prefix="moeopt-miss")
                           if read_threads > 1 else None)
        for t in self._threads:
            t.start()
        # The I/O threads are daemons: one still building an expert's ORT session when the interpreter
        # tears ONNX Runtime down aborts the process (SIGABRT after a finished `moeopt run`), so a cache
        # nobody closed is closed at exit, after the reads already queued.
        atexit.register(self.close)
        self.prefetcher = prefetcher
        self.hint_width = prefetcher.width if prefetcher is not None and prefetcher.graph_hints else None
        try:
            if isinstance(self.policy, CommitteePolicy):
                self._warm_committee(prior)
            if prefetcher is not None:
                prefetcher.attach(self)
        except BaseException:
            self.close()
            raise

    # ---- ExpertSource -------------------------------------------------------------------------------
    def frames(self, fmt: str) -> int:
        return self._t.frames_of[fmt]

    def arrays(self, fmt: str) -> dict[str, np.ndarray]:
        return self._t.pools[fmt]

    def expert(self, fmt: str, frame: int) -> PackedExpert:
        """The packed session of an acquired frame (with a packer)."""
        expert = self._t.packed[fmt][frame]
        if expert is None:
            raise BadInputError(f"frame {frame} of format {fmt} holds no packed expert; acquire it first")
        return expert

    def acquire(self, layer: int, slots: Sequence[int]) -> dict[int, int]:
        """Pin experts ``(layer, s)`` in frames, reading what is missing, and return ``{slot: frame}``.

        Raises:
            BadInputError: a slot that is not cold, more slots of a format than it has frames, or a read
                that failed (here or earlier on an I/O thread).
        """
        keys = [(layer, int(s)) for s in dict.fromkeys(slots)]
        t0 = time.perf_counter()
        with self._cond:
            self._raise_if_failed()
            self._check(keys)
            self._enter_layer(layer)
            c, per = self.counters, self.counters.layer(layer)
            hinted = sum(k in self._hinted for k in keys)
            c.acquired += len(keys)
            c.hinted_acquired += hinted
            per.acquired += len(keys)
            per.hinted_acquired += hinted
            self._hinted.difference_update(keys)
            self._step.protected.update(keys)
            misses = c.misses
            mine, reads = self._pin(keys, count=True)
            per.misses += c.misses - misses
            self._pinned.extend(mine)
        read = self._run_reads(reads)
        if self._await(mine) or read:
            waited = time.perf_counter() - t0
            self.counters.stall_seconds += waited
            per.stall_seconds += waited
        return {key[1]: idx for key, (_, idx) in zip(keys, mine, strict=True)}

    def release(self) -> None:
        with self._cond:
            self._unpin(self._pinned)
            self._pinned = []

    def hint(self, layer: int, slots: Sequence[int]) -> None:
        """The driver's prefetch request (graph predictor outputs): acted on when the prefetcher takes
        graph hints, ignored otherwise (no prefetcher, on-demand, or a prefetcher with its own source).

        The latest hint of a layer supersedes the earlier ones (the look-ahead heads refine what the
        first predictor said): experts hinted before and not named again lose their protection from
        eviction, and their reads are cancelled if they have not started."""
        if self.prefetcher is None or not self.prefetcher.graph_hints:
            return
        wanted = getattr(self.prefetcher, "wanted", None)
        if wanted is not None and not wanted(self.counters.prefetch_issued, self.counters.prefetch_used):
            return
        depth = getattr(self.prefetcher, "depth", None)
        if depth is not None:
            with self._cond:  # 0: the layer the driver runs next
                ahead = layers_until(layer, self._step.layer, len(self.index.top_k)) - 1
            if ahead > depth:
                return
        self._withdraw(layer, {int(s) for s in slots})
        self.prefetch(layer, slots)

    def routed(self, layer: int, slots: Sequence[int]) -> None:
        """The router chose `slots` for `layer`: the layer's other hinted experts were mispredicted, so
        their reads that have not started are cancelled (the I/O thread's time goes to what is needed)
        and their frames may be evicted again."""
        self._withdraw(layer, {int(s) for s in slots})

    def _withdraw(self, layer: int, keep: set[int]) -> None:
        with self._cond:
            for key in [k for k in self._hinted if k[0] == layer and k[1] not in keep]:
                self._hinted.discard(key)
                spot = self._t.where.get(key)
                if spot is not None and (fr := self._t.frame(spot)).state == QUEUED and fr.pins == 0:
                    self._t.clear(spot, key)
                    self.counters.prefetch_dropped += 1

    def keep_mask(self, layer: int) -> np.ndarray | None:
        """For ``committee``: the router mask (E,) allowing the layer's hot experts and its resident cold
        ones (at least top_k, reading more if needed); None for every other policy."""
        pol = self.policy
        if not isinstance(pol, CommitteePolicy):
            return None
        smap, k = self.slots, min(self.index.top_k[layer], int(self.slots.kept(layer).sum()))
        with self._cond:
            self._raise_if_failed()
            allowed = self._allowed(layer)
            self._commit(layer, allowed)  # no swap may take them until the layer has run
        if self._experts_in(layer, allowed) < k:  # warm-up: read the most important cold experts
            t0 = time.perf_counter()
            extra: list[int] = []
            for s in pol.ranked(layer, self._cold[layer]):
                if s not in allowed and self._experts_in(layer, allowed | set(extra)) < k:
                    extra.append(s)
            self._ensure(layer, extra)
            with self._cond:
                allowed = self._allowed(layer)
                self._commit(layer, allowed)
                self.counters.stall_seconds += time.perf_counter() - t0
        return smap.kept(layer) & np.isin(smap.slot_of[layer], sorted(allowed))  # (E,)

    def observe(self, layer: int, logits: np.ndarray) -> None:
        """Router logits (N, E) of a layer just run: committee importance, step count, the prefetcher."""
        with self._cond:
            if layer < self._obs_layer:
                self._steps += 1
                self._swap_wanted |= self._steps == 1 or self._steps % self.refresh_every == 0
            self._obs_layer = layer
            self._enter_layer(layer)
            self._step.protected.clear()  # the layer has run: its experts may make room for the next ones
            self._committed.pop(layer, None)  # the layer has run: its committee may be swapped now
            if isinstance(self.policy, CommitteePolicy):
                self.policy.update(layer, logits)
                if self._swap_wanted and not self._swap_queued and not self._closed:
                    self._swap_queued = True  # re-queued each layer until the committee is complete
                    self._put(self._refresh, self._position + len(self.index.top_k))
        if self.prefetcher is not None:
            self.prefetcher.observe(layer, logits)

    # ---- prefetching --------------------------------------------------------------------------------
    def prefetch(self, layer: int, slots: Sequence[int]) -> None:
        """Queue reads of the cold experts ``(layer, s)`` that are neither resident nor queued; a hint
        with no evictable frame (all pinned, loading or used by the current layer) is dropped."""
        with self._cond:
            if self._closed or self._error is not None:
                return
            for s in slots:
                key = (layer, int(s))
                if key not in self.index.experts:
                    continue
                self._hinted.add(key)
                if key in self._t.where:
                    continue
                spot = self._reserve(key, prefetch=True)
                if spot is None:
                    self.counters.prefetch_dropped += 1
                    continue
                fr = self._t.frame(spot)
                fr.state, fr.prefetched = QUEUED, True
                self.counters.prefetch_issued += 1
                self._put(self._t.job(spot, key), self._needed_at(layer))

    def wait_idle(self) -> None:
        """Block until every queued read and swap has run."""
        self._jobs.join()

    def resident(self) -> set[Key]:
        """The experts whose frames are ready now."""
        with self._cond:
            return self._t.resident()

    def drop_page_cache(self) -> None:
        self.store.drop_page_cache()

    def close(self) -> None:
        """Stop the I/O threads (after the reads already queued) and close the file."""
        if self._closed:
            return
        atexit.unregister(self.close)
        with self._cond:
            self._closed = True
        for _ in self._threads:
            self._put(None, sys.maxsize)  # after every queued read
        for t in self._threads:
            t.join()
        if self._miss_pool is not None:
            self._miss_pool.shutdown(wait=True)
        self.store.close()

    def __enter__(self) -> ExpertCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- internals (the "_locked" ones run with self._cond held) ------------------------------------
    def _check(self, keys: list[Key]) -> None:
        per: dict[str, int] = {}
        for key in keys:
            rec = self.index.experts.get(key)
            if rec is None:
                raise BadInputError(f"layer {key[0]} slot {key[1]} is not a cold expert of the offload index")
            per[rec.format] = per.get(rec.format, 0) + 1
        for fmt, n in per.items():
            if n > self._t.frames_of[fmt]:
                raise BadInputError(f"acquire of {n} experts of format {fmt} but its pool has only "
                                    f"{self._t.frames_of[fmt]} frames; split the request")

    def _needed_at(self, layer: int) -> int:
        """The decode position at which `layer` runs next: the next layer is one past the running one,
        the running layer itself a whole step later (layers run in a cycle)."""
        return self._position + layers_until(layer, self._step.layer, len(self.index.top_k))

    def _put(self, job: Job | Callable[[], None] | None, needed_at: int) -> None:
        """Queue I/O work. Reads go in order of need, not of hinting: a look-ahead hint that refines the
        next layer's experts is read before the earlier, less sure hints for the layers after it; hints
        of one layer keep their order (best first)."""
        self._jobs.put((needed_at, next(self._queued), job))

    def _enter_layer(self, layer: int) -> None:
        if layer != self._step.layer:
            passed = self._step.layer
            self._position += (layer - passed) % len(self.index.top_k) if passed >= 0 else 0
            self._hinted = {k for k in self._hinted if k[0] != passed}  # stale hints of the layer just run
            self._step = _Step(layer)

    def _pin(self, keys: Sequence[Key], count: bool, exclude: set[Key] | None = None) -> tuple[list[Spot], list[Job]]:
        """Pin `keys` (reserving frames for misses, never evicting `exclude`, waiting for a frame if every
        one is busy): the frames and the reads the caller must do."""
        mine: list[Spot] = []
        reads: list[Job] = []
        c = self.counters
        try:
            for key in keys:
                fresh = False
                while (spot := self._t.where.get(key)) is None:
                    if (spot := self._reserve(key, prefetch=False, exclude=exclude)) is not None:
                        fresh = True
                        break
                    self._wait()  # every other frame is loading: wait for one (a swap may bring `key` itself)
                fr = self._t.frame(spot)
                if fresh or fr.state == QUEUED:  # a miss, or a prefetch whose read has not started: read now
                    c.prefetch_dropped += fr.state == QUEUED
                    fr.state = LOADING
                    reads.append(self._t.job(spot, key))
                    c.misses += count
                else:
                    c.hits += count
                    c.prefetch_used += fr.prefetched
                fr.prefetched = False
                self.policy.on_access(key)
                fr.pins += 1
                mine.append(spot)
        except BaseException:  # undo: frames reserved for reads nobody will do must not stay "loading"
            for fmt, idx, _, key in reads:
                self._t.clear((fmt, idx), key)
            self._unpin(mine)
            raise
        return mine, reads

    def _unpin(self, spots: list[Spot]) -> None:
        self._t.unpin(spots)
        self._cond.notify_all()

    def _reserve(self, key: Key, prefetch: bool, exclude: set[Key] | None = None) -> Spot | None:
        """A frame for `key`, or None. A prefetch never takes what the running layer acquired, a hinted
        expert not used yet or one a router mask of this step allows; a miss avoids them while it can,
        then cancels a queued prefetch, then waits (None) for a read in flight."""
        hard = exclude or set()
        soft = self._step.protected | self._hinted | hard
        for keys in self._committed.values():
            soft = soft | keys
        spot = self._t.reserve(key, soft, self._step.layer)
        if spot is None and not prefetch:
            spot = self._t.reserve(key, hard, self._step.layer, cancel_queued=True, must=True)
        return spot

    def _read(self, job: Job) -> None:
        """Read one expert into its frame (outside the lock) and mark it ready, or record the failure."""
        fmt, idx, gen, key = job
        spot = (fmt, idx)
        packed = None
        try:
            views = self._t.views(spot)
            n = self.store.read_into(key[0], key[1], views)
            if self.packer is not None:
                packed = self.packer.build(fmt, views)
        except Exception as e:  # kept and raised by the next acquire
            err = e if isinstance(e, BadInputError) else BadInputError(
                f"reading layer {key[0]} slot {key[1]} from {self.store.path} failed: {e}")
            with self._cond:
                if self._t.frame(spot).gen == gen:
                    self._t.clear(spot, key)
                self._error = self._error or err
                self._cond.notify_all()
            return
        with self._cond:
            fr = self._t.frame(spot)
            if fr.gen == gen:
                fr.state = READY
                self._t.packed[fmt][idx] = packed
                self.policy.on_load(key)
            self.counters.loads += 1
            self.counters.bytes_read += n
            self._cond.notify_all()

    def _run_reads(self, reads: list[Job]) -> bool:
        """Read the misses of one acquire: the first on this thread, the rest beside it (`read_threads`).
        `_read` records a failure instead of raising, so every read finishes before the caller's
        `_await` raises it."""
        pool = self._miss_pool
        if pool is None or len(reads) < 2:
            for job in reads:
                self._read(job)
            return bool(reads)
        others = [pool.submit(self._read, job) for job in reads[1:]]
        self._read(reads[0])
        for f in others:
            f.result()
        return True

    def _await(self, frames: Sequence[Spot]) -> bool:
        """Wait until `frames` are ready; True if it had to wait."""
        waited = False
        with self._cond:
            while True:
                self._raise_if_failed()
                if all(self._t.frame(spot).state == READY for spot in frames):
                    return waited
                waited = True
                self._wait()

    def _wait(self) -> None:
        self._cond.wait(timeout=0.5)
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise BadInputError(str(self._error))

    def _worker(self) -> None:
        while True:
            _, _, job = self._jobs.get()
            try:
                if job is None:
                    return
                if callable(job):
                    try:
                        job()
                    except Exception as e:  # kept and raised by the next acquire, like a failed read
                        with self._cond:
                            self._error = self._error or BadInputError(f"expert cache I/O thread failed: {e}")
                            self._cond.notify_all()
                    continue
                fmt, idx, gen, _ = job
                with self._cond:
                    fr = self._t.frame((fmt, idx))
                    if fr.gen != gen or fr.state != QUEUED:
                        continue  # cancelled, or acquire read it itself
                    fr.state = LOADING
                self._read(job)
            finally:
                self._jobs.task_done()

    # ---- SwapMoE committee --------------------------------------------------------------------------
    def _allowed(self, layer: int) -> set[int]:
        return set(self.index.hot[layer]) | {s for s in self._cold[layer] if self._t.is_ready((layer, s))}

    def _commit(self, layer: int, allowed: set[int]) -> None:
        self._committed[layer] = {(layer, s) for s in allowed if (layer, s) in self.index.experts}

    def _experts_in(self, layer: int, allowed: set[int]) -> int:
        smap = self.slots
        return int((smap.kept(layer) & np.isin(smap.slot_of[layer], sorted(allowed))).sum())

    def _ensure(self, layer: int, slots: Sequence[int]) -> None:
        """Read and unpin (layer, s) for each slot, outside any acquire (committee warm-up). A read never
        evicts what the layer's mask is being built from (the experts already allowed and the ones read
        before it): with a swap's read in flight it waits for that frame rather than take one of them."""
        for s in slots:  # one at a time: a pool may hold only min_frames
            with self._cond:
                self._raise_if_failed()
                keep = set(self._committed.setdefault(layer, set()))
                self._committed[layer].add((layer, s))
                mine, reads = self._pin([(layer, s)], count=True, exclude=keep)
            try:
                self._run_reads(reads)
                self._await(mine)
            finally:
                with self._cond:
                    self._unpin(mine)

    def _warm_committee(self, prior: Sequence[Sequence[float]] | None) -> None:
        """Load the starting committee before the first step: SwapMoE starts from offline importance
        (`prior`: per layer, each slot's routing frequency on calibration data; slot order when absent).
        Without it the prompt would be routed to the first top_k experts read, whatever the budget."""
        assert isinstance(self.policy, CommitteePolicy)
        if prior is not None:
            for i, imp in enumerate(prior):
                values = np.asarray(imp, dtype=np.float64)
                self.policy.importance[i][: values.shape[0]] = values / max(float(values.sum()), 1e-12)
        for layer, s in self.policy.committee(self.index, self._t.frames_of):
            self._ensure(layer, [s])
        with self._cond:
            self._committed.clear()

    def _refresh(self) -> None:
        """On an I/O thread: swap resident cold experts toward the most important committee, as far as
        frames that the running layer does not use allow (the rest on a later call)."""
        assert isinstance(self.policy, CommitteePolicy)
        with self._cond:
            self._swap_queued = False
            if self._error is not None or self._closed:
                return
            want = self.policy.committee(self.index, self._t.frames_of)
            reads: list[Job] = []
            for key in want:
                if key not in self._t.where and (spot := self._reserve(key, prefetch=True, exclude=set(want))):
                    reads.append(self._t.job(spot, key))
        self._run_reads(reads)
        with self._cond:
            self._swap_wanted = any(k not in self._t.where for k in want)


def cache_source(budget_bytes: int, policy: str = "lru", prefetcher: Prefetcher | None = None, *,
                 packed: bool = True, threads: int | None = None,
                 **kw: Any) -> Callable[[OffloadIndex, Path], ExpertCache]:
    """A source factory for ``OffloadSession(artifact, source=...)``: an `ExpertCache` over the artifact
    whose slot map (each layer's ``slot_of``) is read from the artifact's manifest; with `packed`, loaded
    experts run as prepacked sessions of `threads` intra-op threads (default 1, `packed_frames`)."""

    def make(index: OffloadIndex, folder: Path) -> ExpertCache:
        manifest = read_manifest(folder, verify=False)
        layers = manifest.get("layers") or []
        slot_of = [la["slot_of"] for la in layers] if all("slot_of" in la for la in layers) and layers else None
        packer = FramePacker(index, folder, manifest.get("target"), threads) if packed else None
        opts = {"prior": slot_importance(layers), "packer": packer, **kw}  # a caller's prior wins
        return ExpertCache(folder, index, budget_bytes, policy, prefetcher, slot_of=slot_of, **opts)

    return make


def slot_importance(layers: Sequence[dict[str, Any]]) -> list[list[float]] | None:
    """Per layer, each slot's importance as the manifest records it (the `importance` pass's routing
    frequency on calibration data); None unless every slot has one."""
    out = []
    for la in layers:
        slots = (la.get("table") or {}).get("slots") or []
        values = [sl.get("importance") for sl in slots]
        if not values or any(v is None for v in values):
            return None
        out.append([float(v) for v in values])
    return out

