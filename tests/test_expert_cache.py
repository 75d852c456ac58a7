"""The expert store, cache, policies and prefetchers on real packed files and real I/O threads."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moeopt.errors import BadInputError
from moeopt.runtime.cache_policies import SlotMap
from moeopt.runtime.expert_cache import ExpertCache, ExpertStore, cache_source
from moeopt.runtime.expert_store import SlowStorage
from moeopt.runtime.offload_format import EXPERTS_FILE, ExpertSource, OffloadIndex, PoolFormat
from moeopt.runtime.prefetch import GraphHints, Oracle, Recorder, StatsTable, Trace, load_trace, save_trace

Q4 = [{"name": "fc1", "shape": [8, 16], "dtype": "uint8"}, {"name": "s1", "shape": [8, 2], "dtype": "float32"},
      {"name": "fc2", "shape": [4, 32], "dtype": "uint8"}]
F32 = [{"name": "w", "shape": [6, 5], "dtype": "float32"}]


def write_artifact(folder: Path, cold: Sequence[Sequence[int]], hot: Sequence[Sequence[int]],
                   top_k: int | Sequence[int] = 2, fmt_of: Callable[[int, int], str] = lambda li, s: "q4",
                   seed: int = 0) -> tuple[OffloadIndex, dict[tuple[int, int], list[np.ndarray]]]:
    """Pack random experts as page-aligned records (parts concatenated) and parse the manifest section."""
    rng = np.random.default_rng(seed)
    formats = {"q4": {"op": "com.microsoft.QMoE", "graph": "cold_q4.onnx", "parts": Q4},
               "f32": {"op": "com.microsoft.MoE", "graph": "cold_f32.onnx", "parts": F32}}
    parsed = {n: PoolFormat.from_dict(n, d) for n, d in formats.items()}
    records, content, blob = [], {}, bytearray()
    for layer, slots in enumerate(cold):
        for s in slots:
            fmt = parsed[fmt_of(layer, s)]
            parts = [(rng.integers(0, 256, p.shape).astype(p.dtype) if p.dtype == "uint8"
                      else rng.standard_normal(p.shape).astype(p.dtype)) for p in fmt.parts]
            records.append({"layer": layer, "slot": s, "format": fmt.name, "offset": len(blob)})
            content[(layer, s)] = parts
            data = b"".join(a.tobytes() for a in parts)
            blob += data + bytes(fmt.record_bytes - len(data))
    (folder / EXPERTS_FILE).write_bytes(bytes(blob))
    ks = [top_k] * len(cold) if isinstance(top_k, int) else list(top_k)
    sec = {"file": EXPERTS_FILE, "page": 4096, "file_bytes": len(blob),
           "formats": {n: {**d, "record_bytes": parsed[n].record_bytes} for n, d in formats.items()},
           "experts": records, "hot": [list(h) for h in hot], "top_k": ks,
           "num_slots": [len(c) + len(h) for c, h in zip(cold, hot, strict=True)]}
    return OffloadIndex.from_manifest({"offload": sec}), content


def frame_of(cache: ExpertCache, key: tuple[int, int], frame: int) -> list[np.ndarray]:
    return [a[frame] for a in cache.arrays(cache.index.experts[key].format).values()]


def drive(source: ExpertSource, smap: SlotMap, steps: Sequence[Sequence[np.ndarray]],
          settle: Callable[[], None] | None = None, check: Callable[[int, np.ndarray | None], None] | None = None,
          ) -> list[list[int]]:
    """The segment driver's call order in miniature: per step and layer, the router mask, route, acquire
    the chosen cold slots, release, observe the logits (then let I/O settle)."""
    used = []
    for logits_of in steps:
        if settle is not None:
            settle()
        for layer, logits in enumerate(logits_of):
            mask = source.keep_mask(layer)
            if check is not None:
                check(layer, mask)
            chosen = set(int(s) for s in smap.route(layer, logits, mask).ravel())
            cold = sorted(chosen - set(source.index.hot[layer]))
            if cold:
                got = source.acquire(layer, cold)
                assert sorted(got) == cold
                source.release()
            source.observe(layer, logits)
            if settle is not None:
                settle()
            used.append(cold)
    return used


@pytest.fixture
def mixed(tmp_path: Path) -> tuple[Path, OffloadIndex, dict[Any, list[np.ndarray]]]:
    """3 layers, two formats (4-bit parts and float32), 5 cold experts each."""
    index, content = write_artifact(tmp_path, cold=[[1, 2, 3, 4, 5]] * 3, hot=[[0]] * 3,
                                    fmt_of=lambda li, s: "f32" if s % 2 else "q4")
    return tmp_path, index, content


def test_read_into_reads_each_record_exactly(mixed: tuple[Path, OffloadIndex, dict[Any, list[np.ndarray]]]) -> None:
    folder, index, content = mixed
    assert {f.name for f in index.formats.values()} == {"q4", "f32"}
    with ExpertStore(folder, index) as store:
        pools = {n: f.empty_pool(3) for n, f in index.formats.items()}
        for (layer, slot), parts in content.items():
            fmt = index.format_of(layer, slot)
            views = [pools[fmt.name][p.name][1] for p in fmt.parts]
            assert store.read_into(layer, slot, views) == fmt.expert_bytes
            for view, want in zip(views, parts, strict=True):
                np.testing.assert_array_equal(view, want)
            for p in fmt.parts:  # frames 0 and 2 untouched: the read went into frame 1 only
                assert not pools[fmt.name][p.name][[0, 2]].any()
        store.drop_page_cache()
        with pytest.raises(BadInputError, match="not a cold expert"):
            store.read_into(0, 0, views)


def test_slow_storage_serves_reads_one_at_a_time_at_its_bandwidth(
        mixed: tuple[Path, OffloadIndex, dict[Any, list[np.ndarray]]]) -> None:
    """Two threads read every record through a 20 ms + bytes / 50 kB/s device: the same bytes arrive,
    and the reads take at least the device's serial time (they queue, not overlap: overlapped, the two
    threads would finish in about half of it). No upper bound: a loaded machine only adds time."""
    folder, index, content = mixed
    device = SlowStorage(bandwidth=50e3, latency=0.02)
    keys = list(content)
    want = sum(0.02 + index.format_of(*k).expert_bytes / 50e3 for k in keys)

    def read(part: list[tuple[int, int]], store: ExpertStore) -> None:
        for layer, slot in part:
            fmt = index.format_of(layer, slot)
            views = [np.empty(p.shape, p.dtype) for p in fmt.parts]
            store.read_into(layer, slot, views)
            for view, ref in zip(views, content[(layer, slot)], strict=True):
                np.testing.assert_array_equal(view, ref)

    with ExpertStore(folder, index, device) as store:
        t0 = time.perf_counter()
        threads = [threading.Thread(target=read, args=(keys[i::2], store)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        took = time.perf_counter() - t0
    assert took >= want, (want, took)
    for bad in ((0.0, 0.0), (1e6, -1.0)):
        with pytest.raises(BadInputError, match="storage model"):
            SlowStorage(*bad)


def _acquire_every_layer(cache: ExpertCache, content: dict[Any, list[np.ndarray]]) -> None:
    """Acquire slots 1-4 of each of the 3 layers; every frame must hold its expert's bytes."""
    for layer in range(3):
        got = cache.acquire(layer, [1, 2, 3, 4])
        for s, frame in got.items():
            for a, b in zip(frame_of(cache, (layer, s), frame), content[(layer, s)], strict=True):
                np.testing.assert_array_equal(a, b)
        cache.release()


def test_cache_loads_the_right_bytes_into_frames(mixed: tuple[Path, OffloadIndex, dict[Any, list[np.ndarray]]]
                                                 ) -> None:
    folder, index, content = mixed
    with ExpertCache(folder, index, index.min_budget() * 2) as cache:
        _acquire_every_layer(cache, content)
        c = cache.counters
        assert (c.misses, c.hits, c.loads) == (12, 0, 12)
        assert c.bytes_read == sum(index.format_of(li, s).expert_bytes for li in range(3) for s in (1, 2, 3, 4))
        assert c.stall_seconds > 0
        cache.acquire(2, [3, 4])  # just used: resident
        assert (c.hits, c.misses) == (2, 12)
        cache.release()


@pytest.mark.parametrize("read_threads", [1, 2])
def test_misses_of_one_acquire_read_side_by_side(mixed: tuple[Path, OffloadIndex, dict[Any, list[np.ndarray]]],
                                                read_threads: int) -> None:
    """read_threads=2: the misses of one acquire are read on the calling thread and a second one (each
    read into its own frame), with the same bytes in the frames as one thread reading them in turn; a
    read that fails on the second thread is the acquire's one-line error."""
    folder, index, content = mixed
    threads: set[str] = set()
    with ExpertCache(folder, index, index.min_budget() * 2, read_threads=read_threads) as cache:
        read_into = cache.store.read_into

        def spy(layer: int, slot: int, views: Any) -> int:
            threads.add(threading.current_thread().name)
            return read_into(layer, slot, views)

        cache.store.read_into = spy  # type: ignore[method-assign]
        _acquire_every_layer(cache, content)
        assert (cache.counters.misses, cache.counters.loads) == (12, 12)
        assert len(threads) == read_threads and threading.current_thread().name in threads
    with ExpertCache(folder, index, index.min_budget() * 2, read_threads=read_threads) as cache:
        with open(folder / EXPERTS_FILE, "r+b") as f:  # truncated: the last miss's read fails
            f.truncate(index.experts[(0, 4)].offset + 100)
        with pytest.raises(BadInputError, match=r"is truncated: layer 0 slot 4 needs bytes"):
            cache.acquire(0, [1, 2, 3, 4])


@pytest.fixture
def one_fmt(tmp_path: Path) -> tuple[Path, OffloadIndex]:
    """3 layers of 4 cold 4-bit experts, top-1, so each frame count from 1 up works."""
    index, _ = write_artifact(tmp_path, cold=[[0, 1, 2, 3]] * 3, hot=[[]] * 3, top_k=1)
    return tmp_path, index


def run(cache: ExpertCache, *keys: tuple[int, int]) -> None:
    for layer, slot in keys:
        cache.acquire(layer, [slot])
        cache.release()


@pytest.mark.parametrize(("policy", "victim"), [("lru", (0, 1)), ("fifo", (0, 0)), ("lfu", (0, 2))])
def test_recency_and_frequency_victims(one_fmt: tuple[Path, OffloadIndex], policy: str,
                                       victim: tuple[int, int]) -> None:
    folder, index = one_fmt
    size = index.formats["q4"].expert_bytes
    with ExpertCache(folder, index, 3 * size, policy=policy) as cache:
        assert cache.frames("q4") == 3
        # accesses: (0,0) x2, (0,1) x2, (0,2) x1; last touches ordered 1, 0, 2 -> 1 is the LRU one
        run(cache, (0, 0), (0, 1), (0, 1), (0, 0), (0, 2))
        run(cache, (0, 3))
        assert cache.resident() == {(0, 0), (0, 1), (0, 2), (0, 3)} - {victim}
        assert cache.counters.evictions == 1


def test_edgemoe_evicts_the_layer_just_passed(one_fmt: tuple[Path, OffloadIndex]) -> None:
    """Layers run 0, 1, 2, 0, ...: the running layer's other experts are needed last (a whole step
    away), then those of the layer before it; the next layer's are kept longest."""
    folder, index = one_fmt
    size = index.formats["q4"].expert_bytes
    for policy, victim in (("edgemoe", (1, 0)), ("lru", (2, 0))):
        with ExpertCache(folder, index, 3 * size, policy=policy) as cache:
            run(cache, (2, 0), (1, 0), (0, 0))  # layer 0 ran last; layer 1 runs now, then layer 2
            run(cache, (1, 1))  # layer 1's other expert waits a step, layer 0's runs in two layers
            assert cache.resident() == {(2, 0), (1, 0), (0, 0), (1, 1)} - {victim}, policy
    for policy, victim in (("edgemoe", (0, 0)), ("lru", (1, 0))):
        with ExpertCache(folder, index, 3 * size, policy=policy) as cache:
            run(cache, (1, 0), (2, 0), (0, 0))
            cache.observe(0, np.zeros((1, 4), dtype=np.float32))  # layer 0 has run: (0, 0) waits a whole step
            cache.prefetch(1, [1])
            cache.wait_idle()
            assert cache.resident() == {(1, 0), (2, 0), (0, 0), (1, 1)} - {victim}, policy
    with ExpertCache(folder, index, 3 * size, policy="edgemoe") as cache:
        # same layer and distance: the expert with the smaller share of its layer's accesses goes first
        run(cache, (2, 0), (2, 0), (2, 1), (2, 2))
        run(cache, (0, 0))
        assert cache.resident() == {(2, 0), (2, 2), (0, 0)}


def test_pinned_frames_are_never_evicted(one_fmt: tuple[Path, OffloadIndex]) -> None:
    folder, index = one_fmt
    size = index.formats["q4"].expert_bytes
    with ExpertCache(folder, index, 3 * size, policy="lfu", prefetcher=GraphHints()) as cache:
        run(cache, (0, 0), (0, 1), (0, 1), (0, 1), (0, 2), (0, 2), (0, 2))
        got = cache.acquire(0, [0, 3])  # (0,0) is LFU's victim but pinned: 3 takes 1's frame
        assert cache.resident() == {(0, 0), (0, 2), (0, 3)}
        cache.acquire(0, [2])  # every frame pinned now
        cache.hint(1, [0])
        assert cache.counters.prefetch_dropped == 1 and cache.counters.prefetch_issued == 0
        with pytest.raises(BadInputError, match="pinned; release"):
            cache.acquire(1, [1])
        cache.release()
        assert cache.acquire(0, [0, 3]) == got
        cache.release()
        with pytest.raises(BadInputError, match="4 experts of format q4 but its pool has only 3 frames"):
            cache.acquire(1, [0, 1, 2, 3])
        with pytest.raises(BadInputError, match="not a cold expert"):
            cache.acquire(5, [0])


def test_hint_then_acquire_is_a_hit_without_stall(one_fmt: tuple[Path, OffloadIndex]) -> None:
    folder, index = one_fmt
    size = index.formats["q4"].expert_bytes
    with ExpertCache(folder, index, 3 * size, prefetcher=GraphHints(), io_threads=2) as cache:
        cache.hint(1, [2, 3])
        cache.hint(1, [2, 3])  # already queued or resident: skipped
        cache.wait_idle()
        assert cache.resident() == {(1, 2), (1, 3)} and cache.counters.prefetch_issued == 2
        cache.acquire(1, [2, 3])
        cache.release()
        c = cache.counters
        assert (c.hits, c.misses, c.stall_seconds, c.prefetch_issued, c.prefetch_used) == (2, 0, 0.0, 2, 2)
        assert c.recall == 1.0 and c.loads == 2
        cache.acquire(2, [0])
        cache.release()
        assert c.recall == pytest.approx(2 / 3) and c.misses == 1
    with ExpertCache(folder, index, 3 * size, prefetcher=GraphHints()) as cache:
        cache.hint(1, [2, 3])
        cache.hint(1, [2])  # supersedes: 3 loses its hint, and its read if that has not started
        cache.wait_idle()
        c = cache.counters
        assert (1, 2) in cache.resident() and c.prefetch_issued == 2 and c.loads + c.prefetch_dropped == 2
        cache.acquire(1, [2, 3])
        cache.release()
        assert c.hinted_acquired == 1 and c.hits + c.misses == 2
        cache.hint(2, [0])
        cache.hint(2, [])  # an empty hint withdraws the layer's earlier one
        cache.wait_idle()
        cache.acquire(2, [0])
        cache.release()
        assert c.hinted_acquired == 1
    with ExpertCache(folder, index, 3 * size, policy="on-demand") as cache:  # hints are ignored
        cache.hint(1, [2])
        cache.wait_idle()
        assert cache.counters.prefetch_issued == 0 and cache.resident() == set()
    with pytest.raises(BadInputError, match="on-demand cache does no prefetching"):
        ExpertCache(folder, index, 3 * size, policy="on-demand", prefetcher=GraphHints())


def routed_steps(smap: SlotMap, steps: int, layers: int, experts: int, seed: int, tokens: int = 1,
                 chain: bool = False) -> list[list[np.ndarray]]:
    """Random router logits (N, E) per step and layer; with `chain`, layer i+1's top expert is a fixed
    permutation of layer i's (a routing that a transition table can learn)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        step: list[np.ndarray] = []
        for layer in range(layers):
            logits = rng.standard_normal((tokens, experts)).astype(np.float32)
            if chain and layer > 0:
                prev = smap.route(layer - 1, step[-1])[:, 0]  # (N,) the top expert
                logits[np.arange(tokens), (prev * 3 + 1) % experts] += 10.0
            step.append(logits)
        out.append(step)
    return out


def test_oracle_replays_a_recorded_trace_with_full_recall(tmp_path: Path) -> None:
    layers, experts = 4, 8
    index, _ = write_artifact(tmp_path, cold=[range(1, experts)] * layers, hot=[[0]] * layers, top_k=2)
    size = index.formats["q4"].expert_bytes
    smap = SlotMap(index)
    steps = routed_steps(smap, 6, layers, experts, seed=3)
    with ExpertCache(tmp_path, index, 2 * size) as plain:  # the on-demand run records the trace
        rec = Recorder(plain)
        used = drive(rec, smap, steps)
        assert plain.counters.misses > 0
    trace: Trace = rec.trace
    assert len(trace) == len(steps)
    assert [sorted(s) for step in trace for _, s in step] == [u for u in used if u]
    save_trace(trace, tmp_path / "trace.json")
    assert load_trace(tmp_path / "trace.json") == trace
    with ExpertCache(tmp_path, index, 8 * size, prefetcher=Oracle(trace, depth=2)) as cache:
        again = drive(cache, smap, steps, settle=cache.wait_idle)  # settle: the reads overlap compute
        c = cache.counters
        assert again == used
        assert c.recall == 1.0 and c.misses == 0 and c.prefetch_dropped == 0
        assert c.hits == sum(len(u) for u in used) and 0 < c.prefetch_used <= c.hits
        assert c.stall_seconds == 0.0


class _Prefetches:
    """Records what a prefetcher asks of a cache (the only cache call an oracle makes)."""

    def __init__(self, layers: int) -> None:
        self.index = type("Index", (), {"top_k": (1,) * layers})()
        self.asked: list[tuple[int, tuple[int, ...]]] = []

    def prefetch(self, layer: int, slots: Sequence[int]) -> None:
        self.asked.append((layer, tuple(slots)))


def test_causal_oracle_waits_for_the_steps_last_layer() -> None:
    """A full-depth oracle hints the next step's layer 0 right after layer 0 (a whole step ahead); the
    causal one hints nothing of the next step until the step's last layer has run, then all of it."""
    layers = 3
    trace: Trace = [[(i, (10 * t + i,)) for i in range(layers)] for t in range(3)]
    seen: dict[bool, list[list[tuple[int, tuple[int, ...]]]]] = {}
    for causal in (False, True):
        cache = _Prefetches(layers)
        oracle = Oracle(trace, depth=layers, causal=causal)
        oracle.attach(cache)  # type: ignore[arg-type]
        seen[causal] = [list(cache.asked)]
        for _ in range(2):
            for layer in range(layers):
                cache.asked.clear()
                oracle.observe(layer, np.zeros((1, 1)))
                seen[causal].append(list(cache.asked))
    step0 = [(0, (0,)), (1, (1,)), (2, (2,))]
    assert seen[False][0] == seen[True][0] == step0
    assert seen[False][1] == [(1, (1,)), (2, (2,)), (0, (10,))]  # layer 0 ran: next step's layer 0 too
    assert seen[True][1] == [(1, (1,)), (2, (2,))]
    assert seen[True][2] == [(2, (2,))]
    assert seen[True][3] == [(0, (10,)), (1, (11,)), (2, (12,))]  # the step's last layer: all of the next
    assert seen[False][3] == [(0, (10,)), (1, (11,)), (2, (12,))]
    assert seen[True][4] == [(1, (11,)), (2, (12,))]  # the second step, as the first


def test_stats_table_learns_transitions(tmp_path: Path) -> None:
    layers, experts = 3, 8
    index, _ = write_artifact(tmp_path, cold=[range(experts)] * layers, hot=[[]] * layers, top_k=1)
    size = index.formats["q4"].expert_bytes
    smap = SlotMap(index)
    steps = routed_steps(smap, 80, layers, experts, seed=5, chain=True)
    table = StatsTable()
    with ExpertCache(tmp_path, index, 4 * size, prefetcher=table) as cache:
        drive(cache, smap, steps[:60], settle=cache.wait_idle)
        before = cache.counters.as_dict()
        drive(cache, smap, steps[60:], settle=cache.wait_idle)
        after = cache.counters.as_dict()
    # once learned, every acquire of layers 1..L-1 was hinted (layer 0 never is)
    recall = (after["hinted_acquired"] - before["hinted_acquired"]) / (after["acquired"] - before["acquired"])
    assert recall == pytest.approx((layers - 1) / layers)
    # layers 1 and 2 always hit (predicted); only layer 0, which nothing predicts, may miss
    assert after["misses"] - before["misses"] <= 20 and after["hits"] - before["hits"] >= 40
    assert table.counts[0].sum() == table.counts[1].sum() == 80  # one (a, b) pair per token and step
    with ExpertCache(tmp_path, index, 4 * size) as plain:
        rec = Recorder(plain)
        drive(rec, smap, steps[:60])
    fitted = StatsTable(learn=False).fit(rec.trace)
    assert fitted.counts[0].sum() == 60
    with ExpertCache(tmp_path, index, 4 * size, prefetcher=fitted) as cache:
        drive(cache, smap, steps[60:], settle=cache.wait_idle)
        assert cache.counters.recall == pytest.approx((layers - 1) / layers)
    assert fitted.counts[0].sum() == 60


def test_committee_masks_router_to_resident_experts(tmp_path: Path) -> None:
    # layer 0: 8 router experts on 6 slots (expert 6 pruned, expert 7 merged into slot 5); layer 1: identity
    slot_of = [[0, 1, 2, 3, 4, 5, -1, 5], list(range(8))]
    index, _ = write_artifact(tmp_path, cold=[[1, 2, 3, 4, 5], range(1, 8)], hot=[[0], [0]], top_k=2)
    size = index.formats["q4"].expert_bytes
    smap = SlotMap(index, slot_of)
    rng = np.random.default_rng(7)
    favourite = {0: [3, 4], 1: [6, 7]}
    steps = []
    for _ in range(12):
        step = []
        for layer in range(2):
            logits = rng.standard_normal((2, 8)).astype(np.float32)  # (N, E)
            logits[:, favourite[layer]] += 4.0
            step.append(logits)
        steps.append(step)
    # the slot map comes from the artifact's manifest, as the driver's source factory builds it
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"format": "moeopt-artifact", "version": 1, "layers": [{"slot_of": s} for s in slot_of]}))
    make = cache_source(4 * size, policy="committee", refresh_every=2, packed=False)  # synthetic: no cold graph
    with make(index, tmp_path) as cache:
        assert [m.tolist() for m in cache.slots.slot_of] == slot_of

        def check(layer: int, mask: np.ndarray | None) -> None:
            assert mask is not None and mask.shape == (8,)
            resident = {s for li, s in cache.resident() if li == layer}
            allowed = set(index.hot[layer]) | resident
            want = np.isin(smap.slot_of[layer], sorted(allowed)) & smap.kept(layer)
            np.testing.assert_array_equal(mask, want)
            assert mask.sum() >= index.top_k[layer]

        drive(cache, smap, steps[:4], settle=cache.wait_idle, check=check)
        misses = cache.counters.misses
        # acquire never misses: the router only sees resident experts
        drive(cache, smap, steps[4:], settle=cache.wait_idle, check=check)
        assert cache.counters.misses == misses
        assert cache.counters.hits > 0
        cache.wait_idle()
        # the committee moved to the experts the router favours
        assert {(0, 3), (0, 4), (1, 6), (1, 7)} <= cache.resident()
    with ExpertCache(tmp_path, index, 4 * size, policy="lru") as cache:
        assert cache.keep_mask(0) is None


def test_errors_are_one_line(tmp_path: Path) -> None:
    index, _ = write_artifact(tmp_path, cold=[[0, 1, 2]] * 2, hot=[[]] * 2, top_k=2)
    size = index.formats["q4"].expert_bytes
    with pytest.raises(BadInputError) as err:
        ExpertCache(tmp_path, index, 2 * size - 1)
    msg = str(err.value)
    assert f"the minimum that works is {2 * size} bytes" in msg and "\n" not in msg
    path = tmp_path / EXPERTS_FILE
    with ExpertCache(tmp_path, index, 2 * size, prefetcher=GraphHints()) as cache:
        with open(path, "r+b") as f:  # truncated while serving: a failed read on the I/O thread
            f.truncate(index.experts[(1, 0)].offset + 100)
        cache.hint(1, [0])
        cache.wait_idle()
        with pytest.raises(BadInputError, match=r"is truncated: layer 1 slot 0 needs bytes \d+\.\.\d+ but only"):
            cache.acquire(0, [0])
    with pytest.raises(BadInputError) as err:
        ExpertCache(tmp_path, index, 2 * size)
    msg = str(err.value)
    assert msg == (f"expert file {path} is truncated: {path.stat().st_size} bytes, expected "
                   f"{index.file_bytes} bytes")
    path.unlink()
    with pytest.raises(BadInputError) as err:
        ExpertStore(tmp_path, index)
    assert str(err.value) == f"expert file {path} is missing (the offload index expects {index.file_bytes} bytes)"


@pytest.mark.parametrize("policy", ["lru", "edgemoe"])
def test_concurrent_prefetch_and_acquire_keep_frames_consistent(tmp_path: Path, policy: str) -> None:
    layers = 4
    index, content = write_artifact(tmp_path, cold=[range(6)] * layers, hot=[[]] * layers, top_k=2,
                                    fmt_of=lambda li, s: "f32" if s >= 4 else "q4", seed=2)
    rng = np.random.default_rng(11)
    with ExpertCache(tmp_path, index, int(index.min_budget() * 2.5), policy=policy, prefetcher=GraphHints(),
                     io_threads=2) as cache:
        for _ in range(300):  # no settling: reads race with acquires, cancellations and evictions
            layer = int(rng.integers(layers))
            cache.hint(int(rng.integers(layers)), rng.choice(6, size=int(rng.integers(1, 4)), replace=False).tolist())
            want = [int(s) for s in rng.choice(4, size=int(rng.integers(1, 3)), replace=False)]
            want += [4 + int(rng.integers(2))] if rng.random() < 0.5 else []
            got = cache.acquire(layer, want)
            for s, frame in got.items():  # pinned: the frame holds exactly this expert's record
                for a, b in zip(frame_of(cache, (layer, s), frame), content[(layer, s)], strict=True):
                    np.testing.assert_array_equal(a, b)
            cache.release()
        cache.wait_idle()
        c = cache.counters
        assert c.hits + c.misses == c.acquired
        assert c.prefetch_used <= c.prefetch_issued and c.prefetch_issued > 0 and c.prefetch_dropped > 0
        assert c.misses <= c.loads <= c.misses + c.prefetch_issued
        sizes = {f: index.formats[f].expert_bytes for f in index.formats}
        assert c.loads * min(sizes.values()) <= c.bytes_read <= c.loads * max(sizes.values())


def test_acquire_reads_a_queued_prefetch_itself_and_close_stops_the_threads(one_fmt: tuple[Path, OffloadIndex]
                                                                           ) -> None:
    import threading

    folder, index = one_fmt
    size = index.formats["q4"].expert_bytes
    cache = ExpertCache(folder, index, 3 * size, prefetcher=GraphHints())
    gate = threading.Event()

    def hold() -> None:  # keeps the I/O thread busy so the hinted read stays queued
        gate.wait()

    cache._put(hold, 0)
    cache.hint(2, [1])
    assert cache.counters.prefetch_issued == 1 and cache.resident() == set()
    cache.acquire(2, [1])  # does not wait behind the I/O queue: reads it now
    cache.release()
    gate.set()
    cache.wait_idle()
    c = cache.counters
    assert (c.misses, c.hits, c.loads, c.prefetch_used, c.prefetch_dropped) == (1, 0, 1, 0, 1)
    assert cache.resident() == {(2, 1)}
    cache.close()
    cache.close()  # idempotent
    assert not any(t.is_alive() for t in cache._threads)
    cache.hint(2, [2])  # after close: ignored
    assert cache.counters.prefetch_issued == 1


def test_routed_cancels_the_mispredicted_reads_of_the_layer(one_fmt: tuple[Path, OffloadIndex]) -> None:
    """Once the router has chosen, a hinted expert of that layer it did not choose was mispredicted: its
    queued read is cancelled (the I/O thread does not spend time on it) and it loses its protection."""
    import threading

    folder, index = one_fmt
    size = index.formats["q4"].expert_bytes
    cache = ExpertCache(folder, index, 3 * size, prefetcher=GraphHints())
    gate = threading.Event()
    cache._put(gate.wait, 0)  # the I/O thread is busy: the hinted reads stay queued
    cache.hint(1, [2, 3])
    cache.hint(2, [0])  # another layer's hint is not touched
    cache.routed(1, [2])
    assert cache.counters.prefetch_dropped == 1
    gate.set()
    cache.wait_idle()
    assert cache.resident() == {(1, 2), (2, 0)}
    assert cache.counters.loads == 2
    cache.acquire(1, [2])
    cache.release()
    assert cache.counters.hits == 1 and cache.counters.hinted_acquired == 1
    cache.close()


def test_queued_reads_run_in_order_of_need(one_fmt: tuple[Path, OffloadIndex]) -> None:
    """The I/O thread reads what is needed soonest first, whatever order the hints came in: layers run
    0, 1, 2, 0, ..., so after layer 1 ran, layer 2 comes before the next step's layer 0, and that before
    layer 1 again; one layer's hints keep their order (best first)."""
    import threading

    folder, index = one_fmt
    size = index.formats["q4"].expert_bytes
    with ExpertCache(folder, index, 8 * size, prefetcher=GraphHints()) as cache:
        order: list[tuple[int, int]] = []
        read_into = cache.store.read_into

        def logged(layer: int, slot: int, views: Any) -> int:
            order.append((layer, slot))
            return read_into(layer, slot, views)

        cache.store.read_into = logged  # type: ignore[method-assign]
        run(cache, (0, 0), (1, 0))  # layer 1 is running
        gate = threading.Event()
        cache._put(gate.wait, 0)  # hold the I/O thread while the hints queue up
        cache.hint(1, [3])
        cache.hint(0, [2, 1])
        cache.hint(2, [1])
        gate.set()
        cache.wait_idle()
        assert order == [(0, 0), (1, 0), (2, 1), (0, 2), (0, 1), (1, 3)]


def test_a_cache_nobody_closed_finishes_its_io_work_at_exit(tmp_path: Path) -> None:
    """The I/O threads are daemons: a process that exits without closing its cache (a script, `moeopt
    eval` on an offload artifact) must not kill one mid-read, or mid-build of an ORT session (which aborts
    the process), so the cache closes itself at exit, after the work already queued."""
    import subprocess
    import sys

    done = tmp_path / "done"
    script = f"""
import time
from pathlib import Path
from moeopt.runtime.expert_cache import ExpertCache
from tests.test_expert_cache import write_artifact
folder = Path({str(tmp_path)!r})
index, _ = write_artifact(folder, cold=[[0, 1, 2, 3]] * 3, hot=[[]] * 3, top_k=1)
cache = ExpertCache(folder, index, 3 * index.formats["q4"].expert_bytes)
cache._put(lambda: (time.sleep(0.5), Path({str(done)!r}).write_text("ok")), 0)
"""  # exits at once, the cache still open and its I/O thread busy
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parent.parent)
    assert res.returncode == 0, res.stderr[-500:]
    assert done.read_text() == "ok"


def test_graph_hints_stop_when_too_few_prefetches_are_used(one_fmt: tuple[Path, OffloadIndex]) -> None:
    """min_precision: after `warmup` prefetches of which too few were used, hints are ignored (a wasted
    prefetch costs what a miss costs, bench/offload_large.py); without it the same hints keep reading."""
    folder, index = one_fmt
    size = index.formats["q4"].expert_bytes
    for guard, issued in ((None, 4), (0.5, 2)):
        with ExpertCache(folder, index, 3 * size, prefetcher=GraphHints(min_precision=guard, warmup=2)) as cache:
            cache.hint(1, [2, 3])
            cache.wait_idle()
            cache.routed(1, [0])  # the router chose another expert: both prefetches were wasted
            cache.acquire(1, [0])
            cache.release()
            cache.hint(2, [0, 1])
            cache.wait_idle()
            c = cache.counters
            assert (c.prefetch_issued, c.prefetch_used) == (issued, 0), guard
            assert ({(2, 0), (2, 1)} <= cache.resident()) == (guard is None), guard
    with ExpertCache(folder, index, 3 * size, prefetcher=GraphHints(min_precision=0.5, warmup=2)) as cache:
        cache.hint(1, [2, 3])
        cache.wait_idle()
        cache.routed(1, [2, 3])
        cache.acquire(1, [2, 3])  # both used: prefetching goes on
        cache.release()
        cache.hint(2, [0])
        cache.wait_idle()
        assert cache.counters.prefetch_issued == 3 and (2, 0) in cache.resident()
    with pytest.raises(BadInputError, match="min_precision"):
        GraphHints(min_precision=1.5)
