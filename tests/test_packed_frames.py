"""Cold experts as prepacked one-expert sessions (`moeopt.runtime.packed_frames`).

The packed path must compute what the cold graph over the pool computes (logits within 1e-5, greedy
tokens identical), for quantized formats (QMoE, 4- and 2-bit) and float ones (MoE), with the all-resident
source and a small cache that evicts. What the probe says ORT copies must really be copied: a frame keeps
only the other parts, and overwriting the staging buffer after a build changes no output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moeopt.runtime import OffloadSession, cache_source
from moeopt.runtime.offload import AllResident
from moeopt.runtime.offload_format import OffloadIndex
from moeopt.runtime.packed_frames import FramePacker
from tests.lower_helpers import left_padded_batch, manifest
from tests.test_offload_lower import STEPS, TOL, _built

ARTIFACTS = [("q48-hot0", True, 0), ("float-hot1", False, 1)]


def _decode(sess: OffloadSession) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for lengths in ([6], [9, 4]):
        ids, mask = left_padded_batch(lengths)
        g = sess.generate(ids, STEPS, attention_mask=mask, stop_tokens=(), keep_logits=True)
        out.append((g.sequences, np.stack(g.step_logits)))
    return out


@pytest.mark.parametrize(("name", "quantized", "hot"), ARTIFACTS)
def test_packed_equals_cold_graph(tmp_path_factory: pytest.TempPathFactory, name: str, quantized: bool,
                                  hot: int) -> None:
    art = _built(name, quantized, tmp_path_factory, experts="offload", hot=hot)
    index = OffloadIndex.from_manifest(manifest(art))
    graph = OffloadSession(art, source=lambda i, p: AllResident(i, p, packed=False))
    assert not graph.packed and graph.cold_sessions
    want = _decode(graph)
    for source in (lambda i, p: AllResident(i, p), cache_source(index.min_budget(), "lru")):
        with OffloadSession(art, source=source) as sess:
            assert sess.packed and not sess.cold_sessions  # no cold graph is opened
            for (ws, wl), (gs, gl) in zip(want, _decode(sess), strict=True):
                assert np.array_equal(gs, ws)
                assert np.abs(gl - wl).max() <= TOL


def test_probe_finds_what_ort_copies(tmp_path_factory: pytest.TempPathFactory) -> None:
    """4-bit QMoE prepacks its weights (copied) and reads scales at run time (2-bit QMoE prepacks
    nothing in ORT 1.32); the cache pools keep only what is read at run time, and a build survives its
    staging buffer being overwritten."""
    art = _built("q48-hot0", True, tmp_path_factory, experts="offload", hot=0)
    index = OffloadIndex.from_manifest(manifest(art))
    packer = FramePacker(index, art, threads=1)
    assert any("4bit" in name for name in index.formats)
    for name, fmt in index.formats.items():
        weights = {p.name for p in fmt.parts if p.dtype == "uint8" and "zero" not in p.name}
        if "4bit" in name:
            assert weights and weights <= packer.copied[name], (name, packer.copied[name])
        assert set(packer.pooled(name)) == {p.name for p in fmt.parts} - packer.copied[name]
        assert any("scales" in p for p in packer.pooled(name))  # read at run time in every format
    with cache_source(index.min_budget(), "lru")(index, Path(art)) as cache:
        for name in index.formats:
            assert set(cache.arrays(name)) == set(packer.pooled(name))
        (layer, slot), rec = next((k, r) for k, r in index.experts.items() if packer.copied[r.format])
        where = cache.acquire(layer, [slot])
        expert = cache.expert(rec.format, where[slot])
        x = np.random.default_rng(0).standard_normal((3, packer.hidden(rec.format)), dtype=np.float32)
        w = np.full((3, 1), 0.5, dtype=np.float32)
        before = expert.run(x, w)
        for buf in cache.packer.staging(rec.format).values():  # type: ignore[union-attr]
            buf[...] = 3
        np.testing.assert_array_equal(expert.run(x, w), before)
        assert np.abs(before).max() > 0
        cache.release()



def test_loads_reuse_the_frames_ortvalues(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Every expert loaded into a frame reuses the OrtValues made for that frame's memory (and for each
    thread's staging buffers): after cycling every cold expert through the smallest cache, and again,
    the packer wraps no more buffers than the pools and staging hold, and outputs still equal the
    all-resident source's."""
    art = _built("q48-hot0", True, tmp_path_factory, experts="offload", hot=0)
    index = OffloadIndex.from_manifest(manifest(art))
    resident = AllResident(index, Path(art))
    with cache_source(index.min_budget(), "lru")(index, Path(art)) as cache:
        packer = cache.packer
        assert packer is not None
        bound = sum(cache.frames(n) * len(packer.pooled(n)) + 2 * len(packer.copied[n]) for n in index.formats)
        x = np.random.default_rng(1).standard_normal((2, packer.hidden(next(iter(index.formats)))), dtype=np.float32)
        w = np.full((2, 1), 0.5, dtype=np.float32)
        counts = []
        for _ in range(2):
            for (layer, slot), rec in sorted(index.experts.items()):
                where = cache.acquire(layer, [slot])
                got = cache.expert(rec.format, where[slot]).run(x, w)
                cache.release()
                want = resident.expert(rec.format, resident.acquire(layer, [slot])[slot]).run(x, w)
                np.testing.assert_array_equal(got, want)
            counts.append(packer.wrapped_buffers)
        assert cache.counters.loads >= 2 * len(index.experts) - cache.frames(next(iter(index.formats)))
        assert counts[0] == counts[1] <= bound, (counts, bound)


@pytest.mark.parametrize("level", [0, 4])
def test_copied_parts_are_never_read_at_any_token_count(tmp_path_factory: pytest.TempPathFactory, level: int,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the probe calls copied is not read at run time for any number of tokens: after a build,
    overwriting the staging buffers changes no output for 1 to 200 tokens (a prefill routes many tokens
    to one expert). On the 8x7B-shaped artifact of bench/scale.py (accuracy level 4, 99 MB experts) a probe
    with 2 tokens only called parts copied that ORT reads at run time for more tokens; later loads
    overwrote them in the staging buffer, and the cache's logits were 4.5 away from the all-resident
    source's (`bench/offload_consistency.py`; 0 with the probe at 1, 2 and 64 tokens). This tiny model does
    not reach that kernel path: the 2-token probe passes here too, so this test states the guarantee at
    these sizes and the 8x7B measurement is the regression's evidence."""
    art = _built(f"q48-hot0-level{level}", True, tmp_path_factory, experts="offload", hot=0, accuracy_level=level)
    index = OffloadIndex.from_manifest(manifest(art))
    with cache_source(index.min_budget(), "lru")(index, Path(art)) as cache:
        packer = cache.packer
        assert packer is not None
        rng = np.random.default_rng(2)
        for (layer, slot), rec in sorted(index.experts.items())[:4]:
            where = cache.acquire(layer, [slot])
            expert = cache.expert(rec.format, where[slot])
            xs = [rng.standard_normal((n, packer.hidden(rec.format)), dtype=np.float32) for n in (1, 3, 64, 200)]
            before = [expert.run(x, np.full((len(x), 1), 0.5, dtype=np.float32)) for x in xs]
            for buf in packer.staging(rec.format).values():
                buf[...] = 3
            for x, b in zip(xs, before, strict=True):
                np.testing.assert_array_equal(expert.run(x, np.full((len(x), 1), 0.5, dtype=np.float32)), b)
            cache.release()


def test_big_experts_run_on_a_thread_per_core(tmp_path_factory: pytest.TempPathFactory,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Small experts run on one intra-op thread, experts from `BIG_EXPERT` bytes up on ORT's default (one
    per core); both compute the same output (within 1e-5: the work may be split differently)."""
    from moeopt.runtime import packed_frames

    art = _built("q48-hot0", True, tmp_path_factory, experts="offload", hot=0)
    index = OffloadIndex.from_manifest(manifest(art))
    small = FramePacker(index, art)
    assert all(small.threads_of(n) == 1 for n in index.formats)  # the tiny model's experts are KBs
    assert all(FramePacker(index, art, threads=3).threads_of(n) == 3 for n in index.formats)  # asked for
    monkeypatch.setattr(packed_frames, "BIG_EXPERT", 0)
    big = FramePacker(index, art)
    assert all(big.threads_of(n) == 0 for n in index.formats)
    store = AllResident(index, Path(art), packed=False)
    for (layer, slot), rec in sorted(index.experts.items())[:4]:
        fmt = index.formats[rec.format]
        frame = store.acquire(layer, [slot])[slot]
        views = [store.arrays(rec.format)[p.name][frame] for p in fmt.parts]
        x = np.random.default_rng(layer).standard_normal((5, small.hidden(rec.format)), dtype=np.float32)
        w = np.full((5, 1), 0.5, dtype=np.float32)
        one, per_core = small.build(rec.format, views).run(x, w), big.build(rec.format, views).run(x, w)
        assert np.abs(one).max() > 0
        np.testing.assert_allclose(per_core, one, rtol=1e-5, atol=1e-5 * float(np.abs(one).max()))
