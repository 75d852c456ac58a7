"""Serving an offload artifact from a budgeted `ExpertCache` through the real segment driver.

Every policy that does not change routing must decode exactly like the resident artifact (greedy
tokens identical, logits within 1e-5) down to the smallest budget that runs; the committee (which masks
the router) must run and only ever route to experts in memory. The CLI refuses a budget below the
minimum (naming it) and a truncated expert file, with one line and exit code 2.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moeopt.runtime import ExpertCache, OffloadSession, cache_source
from moeopt.runtime.offload import AllResident
from moeopt.runtime.offload_format import OffloadIndex
from moeopt.runtime.prefetch import GraphHints, Oracle, Recorder, StatsTable
from tests.lower_helpers import left_padded_batch, manifest
from tests.test_cli import run_cli
from tests.test_offload_lower import STEPS, _assert_same_decode, _built


def _tracking(base: Any, made: list[ExpertCache]) -> Any:
    def factory(index: OffloadIndex, path: Path) -> ExpertCache:
        cache = base(index, path)
        made.append(cache)
        return cache

    return factory


@pytest.mark.parametrize(("policy", "prefetch", "mult"), [
    ("lru", None, 1), ("lfu", None, 1), ("edgemoe", "stats", 1), ("on-demand", None, 1), ("lru", "graph", 2),
])
def test_cache_decodes_like_resident(tmp_path_factory: pytest.TempPathFactory, policy: str, prefetch: str | None,
                                     mult: int) -> None:
    """Float tiny Mixtral, one hot expert per layer, an (untrained) in-graph predictor giving hints."""
    resident = _built("mixtral", False, tmp_path_factory)
    offload = _built("float-hot1", False, tmp_path_factory, predictor=True, experts="offload", hot=1)
    index = OffloadIndex.from_manifest(manifest(offload))
    made: list[ExpertCache] = []
    pre = {"stats": StatsTable, "graph": GraphHints}[prefetch]() if prefetch else None
    sess = _assert_same_decode(resident, offload, source=_tracking(cache_source(index.min_budget() * mult, policy,
                                                                                 pre), made))
    c = made[0].counters
    assert c.acquired > 0 and c.misses > 0  # a small cache really loads (on a cold start at least)
    assert c.bytes_read >= c.misses * min(f.expert_bytes for f in index.formats.values())
    # the per-layer counters split the totals: every MoE layer acquired, and the sums are the totals
    assert sorted(c.layers) == list(range(len(index.top_k)))
    assert sum(la.acquired for la in c.layers.values()) == c.acquired
    assert sum(la.misses for la in c.layers.values()) == c.misses
    assert sum(la.hinted_acquired for la in c.layers.values()) == c.hinted_acquired
    assert sum(la.stall_seconds for la in c.layers.values()) == pytest.approx(c.stall_seconds)
    if prefetch == "graph":
        assert c.prefetch_issued > 0  # the hints of seg0's predictor outputs reached the cache
    sess.close()


def test_oracle_prefetch_hints_every_expert_it_uses(tmp_path_factory: pytest.TempPathFactory) -> None:
    """4-/2-bit experts (two cold formats), no hot experts; the oracle replays the recorded routing."""
    offload = _built("q48-hot0", True, tmp_path_factory, experts="offload", hot=0)
    ids, mask = left_padded_batch([6])
    rec = OffloadSession(offload, source=lambda i, p: Recorder(AllResident(i, p)))
    want = rec.generate(ids, 8, attention_mask=mask, stop_tokens=(), keep_logits=True)
    trace = rec.source.trace
    index = OffloadIndex.from_manifest(manifest(offload))
    budget = index.cold_bytes()  # room for everything: misses can only come from late prefetches
    with OffloadSession(offload, source=cache_source(budget, "lru", Oracle(trace, depth=len(index.top_k)))) as sess:
        got = sess.generate(ids, 8, attention_mask=mask, stop_tokens=(), keep_logits=True)
        c = sess.source.counters
    assert np.array_equal(got.sequences, want.sequences)
    assert np.abs(np.stack(got.step_logits) - np.stack(want.step_logits)).max() <= 1e-5
    assert c.recall == 1.0  # every acquired expert had been hinted
    # A miss can only be a hinted expert whose read had not started yet (acquire then reads it itself
    # and drops the queued prefetch): how many depends on thread timing, never on what was hinted.
    assert c.misses <= c.prefetch_dropped


def _watch_committee(cache: ExpertCache, seen: dict[str, int]) -> ExpertCache:
    """Wrap a committee cache's keep_mask / acquire / observe (the driver's calls) to check, at each
    acquire, that every expert asked for was allowed by the layer's mask and ready in memory when the
    mask was given, and that acquire read nothing; counts how often the unmasked router would have
    chosen a cold expert outside the committee (the test is vacuous if never)."""
    keep_mask, acquire, observe = cache.keep_mask, cache.acquire, cache.observe
    allowed: dict[int, set[int]] = {}
    ready: dict[int, set[tuple[int, int]]] = {}

    def masked(layer: int) -> np.ndarray | None:
        mask = keep_mask(layer)
        assert mask is not None
        allowed[layer] = {int(s) for s in cache.slots.slot_of[layer][mask]}
        ready[layer] = cache.resident()
        seen["masks"] += 1
        seen["restricted"] += int(mask.sum()) < int(cache.slots.kept(layer).sum())
        return mask

    def acquired(layer: int, slots: Sequence[int]) -> dict[int, int]:
        for s in slots:
            assert int(s) in allowed[layer], (layer, s, allowed[layer])  # routed only inside the committee
            assert (layer, int(s)) in ready[layer], (layer, s)  # ... and only to experts already in memory
        per = cache.counters.layer(layer)
        misses = per.misses
        where = acquire(layer, slots)
        assert per.misses == misses  # nothing had to be read for it
        seen["acquired"] += len(slots)
        return where

    def observed(layer: int, logits: np.ndarray) -> None:
        chosen = {int(s) for s in cache.slots.route(layer, logits).reshape(-1)}  # without the mask
        seen["outside"] += bool((chosen - allowed[layer]) & set(cache.index.cold(layer)))
        observe(layer, logits)

    cache.keep_mask = masked  # type: ignore[method-assign]
    cache.acquire = acquired  # type: ignore[method-assign]
    cache.observe = observed  # type: ignore[method-assign]
    return cache


def test_committee_routes_only_to_experts_in_memory(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Twelve short decodes in the smallest budget (swaps race with the warm-up reads of the masks): on
    the code before the fix about half of such runs routed to an expert evicted after its mask was given."""
    offload = _built("q48-hot0", True, tmp_path_factory, experts="offload", hot=0)
    index = OffloadIndex.from_manifest(manifest(offload))
    seen = {"masks": 0, "restricted": 0, "acquired": 0, "outside": 0}
    for seed in range(4):
        for lengths in ([6], [9, 4, 2], [3, 7]):
            ids, mask = left_padded_batch(lengths, seed=seed)
            base = cache_source(index.min_budget(), "committee")
            with OffloadSession(offload, source=lambda i, p, base=base: _watch_committee(base(i, p), seen)) as sess:
                g = sess.generate(ids, STEPS, attention_mask=mask, stop_tokens=())
            assert g.sequences.shape[1] == ids.shape[1] + STEPS
    assert seen["acquired"] > 0 and seen["masks"] >= 12 * STEPS * len(index.top_k)
    # Not vacuous: the committee is smaller than the layer, and the model's own router would have left it.
    assert seen["restricted"] > 0 and seen["outside"] > 0, seen


def test_committee_with_room_for_every_expert_is_exact(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The committee starts loaded (SwapMoE's offline set): with a budget for every expert it masks nothing."""
    resident = _built("q48-resident", True, tmp_path_factory)
    offload = _built("q48-hot0", True, tmp_path_factory, experts="offload", hot=0)
    index = OffloadIndex.from_manifest(manifest(offload))
    made: list[ExpertCache] = []
    warm: list[int] = []
    base = cache_source(index.cold_bytes(), "committee")

    def factory(i: OffloadIndex, path: Path) -> ExpertCache:
        cache = base(i, path)
        warm.append(cache.counters.loads)  # every expert read before the first step
        made.append(cache)
        return cache

    _assert_same_decode(resident, offload, source=factory)
    assert warm[0] == len(index.experts)
    c = made[0].counters  # no read after the warm start, and every use of an expert hit
    assert c.loads == len(index.experts) and c.acquired > 0 and c.hits == c.acquired
    made[0].close()


def test_run_cli_budget_errors_and_counters(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    offload = _built("q48-hot0", True, tmp_path_factory, experts="offload", hot=0)
    index = OffloadIndex.from_manifest(manifest(offload))
    code, out, err = run_cli("run", str(offload), "--ids", "5,17,3,9", "--max-new-tokens", "6", "--budget",
                             str(index.min_budget()), "--policy", "lru", capsys=capsys)
    assert code == 0, err
    assert "hit rate" in out and "misses" in out
    by_layer = next(line for line in out.splitlines() if line.startswith("[misses / stall by layer: "))
    assert all(f"{i}: " in by_layer for i in range(len(index.top_k)))
    code, out, err = run_cli("run", str(offload), "--ids", "5,17,3", "--budget", str(index.min_budget() - 1),
                             capsys=capsys)
    assert code == 2
    assert str(index.min_budget()) in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli("run", str(offload), "--ids", "5,17", "--budget", str(index.min_budget()),
                             "--policy", "on-demand", "--prefetch", "stats", capsys=capsys)
    assert code == 2 and "never prefetches" in err and len(err.strip().splitlines()) == 1
    resident = _built("mixtral", False, tmp_path_factory)
    code, out, err = run_cli("run", str(resident), "--ids", "5,17", "--budget", "1MB", capsys=capsys)
    assert code == 2 and "offload artifact" in err
    broken = tmp_path / "broken"
    shutil.copytree(offload, broken)
    with (broken / "experts.bin").open("r+b") as f:
        f.truncate(4096)
    code, out, err = run_cli("run", str(broken), "--ids", "5,17", "--budget", str(index.min_budget()), capsys=capsys)
    assert code == 2 and "experts.bin" in err and len(err.strip().splitlines()) == 1


def test_run_cli_stops_the_cache_threads_before_it_returns(tmp_path_factory: pytest.TempPathFactory,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """`moeopt run` closes its expert cache: an I/O thread still building a prefetched expert's session
    when the interpreter tore ONNX Runtime down made the process abort after printing (exit 134, seen on
    the reference model with graph prefetch)."""
    import threading

    offload = _built("float-hot1", False, tmp_path_factory, predictor=True, experts="offload", hot=1)
    index = OffloadIndex.from_manifest(manifest(offload))  # it has prefetch hints: reads on the I/O thread
    before = set(threading.enumerate())
    code, out, err = run_cli("run", str(offload), "--ids", "5,17,3,9", "--max-new-tokens", "8", "--budget",
                             str(index.min_budget() * 2), capsys=capsys)
    assert code == 0, err
    assert "prefetch recall" in out
    left = [t.name for t in set(threading.enumerate()) - before if t.name.startswith("moeopt-io")]
    assert left == []
