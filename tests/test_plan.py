"""The `plan` pass (SwapMoE's budget planner), its latency model and solver, target profiles, `moeopt plan`."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

import moeopt
from moeopt.errors import BadInputError, InfeasibleBudgetError
from moeopt.passes import PassManager, build, parse_pipeline
from moeopt.passes.plan import PlanProblem, evaluate, min_budget, slot_bytes, solve
from moeopt.targets import expert_bytes, load_profile, measure_profile, save_profile
from moeopt.units import parse_bytes, parse_seconds
from tests.test_cli import run_cli

# A fixed profile (no timing in tests): 1 ms resident, 5 ms cold per expert, 10 MB/s storage.
PROFILE = {"format": "moeopt-target-profile", "version": 1, "read_bandwidth": 1e7, "page_cache_dropped": True,
           "resident_s_per_expert": 1e-3, "cold_s_per_expert": 5e-3,
           "expert": {"hidden": 32, "intermediate": 48, "bits": None, "glu": True}}


@pytest.mark.parametrize(("text", "n"), [
    ("64MB", 64_000_000), ("1.5GiB", 1_610_612_736), ("4096", 4096), ("2KiB", 2048), ("3 kb", 3000),
    ("1GB", 10**9), ("7B", 7), (" 10MiB ", 10 * 2**20), (512, 512),
])
def test_parse_bytes(text: str | int, n: int) -> None:
    assert parse_bytes(text) == n


@pytest.mark.parametrize(("text", "s"), [("50ms", 0.05), ("2s", 2.0), ("250us", 2.5e-4), ("0.1", 0.1), (3, 3.0)])
def test_parse_seconds(text: str | float, s: float) -> None:
    assert parse_seconds(text) == pytest.approx(s, rel=1e-12)


@pytest.mark.parametrize("bad", ["", "MB", "-1MB", "5XB", "1e3", "nan", "12 parsecs", "1.2.3KB", -5, True])
def test_parse_bytes_errors_are_one_line(bad: str | int) -> None:
    with pytest.raises(BadInputError, match="size in bytes") as info:
        parse_bytes(bad)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("bad", ["", "ms", "-5ms", "5 hours", "inf", "1e3s"])
def test_parse_seconds_errors(bad: str) -> None:
    with pytest.raises(BadInputError, match="duration"):
        parse_seconds(bad)


def _problem(shares: list[list[float]], nbytes: list[list[int]], top_k: int = 2, res: float = 1e-3, cold: float = 5e-3,
             bandwidth: float = 1e7) -> PlanProblem:
    return PlanProblem(
        tuple(tuple(top_k * f for f in row) for row in shares), tuple(tuple(r) for r in nbytes),
        tuple(tuple(b / bandwidth for b in r) for r in nbytes), tuple(top_k for _ in shares),
        tuple(res for _ in shares), tuple(cold for _ in shares))


def _zipf(n: int, s: float, perm: list[int]) -> list[float]:
    w = [1.0 / (perm[i] + 1) ** s for i in range(n)]
    return [x / sum(w) for x in w]


SKEWED = [_zipf(8, 1.2, [3, 0, 5, 1, 7, 2, 6, 4]), _zipf(8, 0.8, [0, 1, 2, 3, 4, 5, 6, 7])]


def brute_force(p: PlanProblem, budget: int) -> tuple[float, list[set[int]], list[set[int]]]:
    """The best latency by enumerating every hot / cached / missed assignment (3^experts)."""
    keys = [(li, s) for li in range(len(p.rates)) for s in p.slots(li)]
    best: tuple[float, list[set[int]], list[set[int]]] = (float("inf"), [], [])
    for states in itertools.product((0, 1, 2), repeat=len(keys)):
        hot: list[set[int]] = [set() for _ in p.rates]
        cached: list[set[int]] = [set() for _ in p.rates]
        for (li, s), st in zip(keys, states, strict=True):
            if st:
                (hot if st == 1 else cached)[li].add(s)
        e = evaluate(p, hot, cached)
        if e.needed_bytes <= budget and e.latency_s < best[0]:
            best = (e.latency_s, hot, cached)
    return best


def test_evaluate_matches_the_stated_model_by_hand() -> None:
    p = _problem([[0.75, 0.25]], [[1000, 1000]], top_k=1)  # uses 0.75 / 0.25 per token; a read is 0.1 ms
    e = evaluate(p, [{0}], [set()])
    assert e.latency_s == pytest.approx(0.75 * 1e-3 + 0.25 * (5e-3 + 1e-4), rel=1e-12)
    assert e.misses == pytest.approx(0.25) and e.hit_rate == 0.0 and e.working_bytes == 1000
    e = evaluate(p, [set()], [{1}])
    assert e.latency_s == pytest.approx(0.75 * (5e-3 + 1e-4) + 0.25 * 5e-3, rel=1e-12)
    assert e.hit_rate == pytest.approx(0.25) and e.needed_bytes == 2000


def test_hot_sets_are_the_most_frequent_and_latency_falls_with_budget() -> None:
    p = _problem(SKEWED, [[1000] * 8, [1000] * 8])
    assert min_budget(p) == 2000
    latencies = []
    for budget in range(2000, 17001, 500):
        hot, cached, how = solve(p, budget)
        e = evaluate(p, hot, cached)
        assert how == "search:optimal"
        assert e.needed_bytes <= budget  # hot + cached + working frames fit
        for li, row in enumerate(SKEWED):  # every hot expert is routed to at least as often as every cold one
            cold = [row[s] for s in range(8) if s not in hot[li]]
            assert all(row[h] >= max(cold, default=0.0) for h in hot[li])
        latencies.append(e.latency_s)
    assert all(b <= a + 1e-15 for a, b in itertools.pairwise(latencies))
    assert latencies[-1] < 0.5 * latencies[0]  # all hot (16 KB) is far faster than all cold


def test_budget_below_minimum_names_it() -> None:
    p = _problem(SKEWED, [[1000] * 8, [1000] * 8])
    with pytest.raises(InfeasibleBudgetError, match=r"minimum is 2000 bytes") as info:
        solve(p, 1999)
    assert "\n" not in str(info.value)
    solve(p, 2000)


@pytest.mark.parametrize(("res", "cold", "sizes"), [
    (1e-3, 5e-3, [[1000] * 3, [1000] * 3]),  # hot beats cached: the exact search
    (6e-3, 5e-3, [[1000] * 3, [1000] * 3]),  # resident slower than cold (tiny experts): cached wins
    (1e-3, 5e-3, [[1000] * 3, [1500] * 3]),  # sizes differ between layers: the integer program
])
def test_plan_is_optimal_by_enumeration(res: float, cold: float, sizes: list[list[int]]) -> None:
    shares = [[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]]
    p = _problem(shares, sizes, top_k=2, res=res, cold=cold)
    for budget in range(min_budget(p), sum(map(sum, sizes)) + 1001, 250):
        hot, cached, how = solve(p, budget)
        e = evaluate(p, hot, cached)
        best, _, _ = brute_force(p, budget)  # every hot / cached / missed assignment: 3^6
        assert e.needed_bytes <= budget
        assert e.latency_s == pytest.approx(best, rel=1e-12, abs=1e-15), (budget, how)
        assert how.endswith("optimal")


def _calib(path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    path.write_text("".join(json.dumps({"ids": torch.randint(0, 97, (64,), generator=g).tolist()}) + "\n"
                            for _ in range(6)))
    return path


def test_pipeline_text_round_trips() -> None:
    text = "importance{calib=app:intent},plan{budget=4MB}"
    assert parse_pipeline(text).text() == text
    assert ",".join(p.text() for p in build(text)) == text


def test_plan_pass_sets_the_plan_and_survives_checkpoint(tiny_ckpt: Path, tmp_path: Path) -> None:
    model = moeopt.load(tiny_ckpt)
    prof = save_profile(PROFILE, tmp_path / "profile.json")
    calib = _calib(tmp_path / "c.jsonl")
    e_bytes = slot_bytes(model, None)[0][0]
    assert e_bytes == expert_bytes(32, 48, None, True)  # float32 gate, up and down
    budget = 4 * e_bytes + 100  # 2 working frames + 2 held experts
    pm = PassManager(f"importance{{calib={calib},seq-len=32,progress=false}},"
                     f"plan{{budget={budget},latency=1ms,profile={prof},policy=lru}}", verify_each=True)
    ids = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(1))
    ref = model.logits(ids)
    report = pm.run(model)
    plan = report.model.plan
    assert plan is not None and torch.equal(model.logits(ids), ref)  # an analysis: outputs unchanged
    assert plan["budget_bytes"] == budget and plan["policy"] == "lru" and plan["frequency_source"] == "importance"
    assert sum(map(len, plan["hot"])) + sum(map(len, plan["cached"])) == 2
    assert plan["expected"]["resident_expert_bytes"] + plan["cache_bytes"] == budget
    imp = pm.ctx.analyses.peek("importance")
    for li, hot in enumerate(plan["hot"]):
        freq = imp.layers[li].freq
        assert all(float(freq[h]) >= max(float(freq[s]) for s in range(4) if s not in hot) for h in hot)
    assert plan["latency_target_ms"] == pytest.approx(1.0) and isinstance(plan["meets_latency"], bool)
    assert not plan["meets_latency"] and plan["warnings"]  # ~4 uses x 5 ms cold per token cannot meet 1 ms
    stats = dict(report.stats)["plan"]
    assert stats["meets-latency"] == 0.0 and stats["warning-latency-over-target-ms"] > 0
    json.dumps(plan)  # JSON-able as promised
    report.model.save(tmp_path / "planned")
    assert moeopt.load(tmp_path / "planned").plan == plan


def test_plan_without_importance_is_uniform_and_bits_shrink_experts(tiny_ckpt: Path, tmp_path: Path) -> None:
    model = moeopt.load(tiny_ckpt)
    prof = save_profile(PROFILE, tmp_path / "profile.json")
    q = expert_bytes(32, 48, 4, True, 16)  # 48 is not whole blocks of 32: QMoE reads blocks of 16
    assert slot_bytes(model, 4) == [[q] * 4, [q] * 4]
    assert q * 5 < expert_bytes(32, 48, None, True)  # 4-bit codes + a float32 scale per 16: 6 of 32 bits
    PassManager(f"plan{{budget={8 * q},profile={prof},bits=4}}").run(model)
    assert model.plan is not None and model.plan["frequency_source"] == "uniform"
    assert model.plan["meets_latency"] and model.plan["min_budget_bytes"] == 2 * q
    assert any("assumes 4" in w for w in model.plan["warnings"])  # the profile was measured for float32
    with pytest.raises(InfeasibleBudgetError, match=f"minimum is {2 * q} bytes"):
        PassManager(f"plan{{budget={2 * q - 1},profile={prof},bits=4}}").run(model)
    with pytest.raises(BadInputError, match="needs a budget"):
        PassManager(f"plan{{profile={prof}}}").run(model)
    with pytest.raises(BadInputError, match="duration"):
        PassManager(f"plan{{budget=1MB,latency=soon,profile={prof}}}").run(model)


def test_measure_profile_tiny(tmp_path: Path) -> None:
    for bits in (4, None):
        prof = measure_profile(32, 64, bits, True, file_bytes=256 * 1024, repeats=3, folder=tmp_path)
        for key in ("read_bandwidth", "resident_s_per_expert", "cold_s_per_expert", "pack_s_per_expert"):
            assert prof[key] > 0, key
        assert prof["expert"]["expert_bytes"] == expert_bytes(32, 64, bits, True)
        assert prof["expert"]["record_bytes"] % 4096 == 0 and prof["expert"]["record_bytes"] >= 3840
        assert load_profile(save_profile(prof, tmp_path / "p.json")) == prof
    assert not list(tmp_path.glob("moeopt-bw-*"))  # the bandwidth file is removed
    (tmp_path / "bad.json").write_text(json.dumps({"read_bandwidth": -1}))
    with pytest.raises(BadInputError, match="lacks"):
        load_profile(tmp_path / "bad.json")
    for pack in ("soon", -1e-3, float("nan")):
        (tmp_path / "bad.json").write_text(json.dumps({**PROFILE, "pack_s_per_expert": pack}))
        with pytest.raises(BadInputError, match="pack_s_per_expert"):
            load_profile(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(BadInputError, match="not a target profile"):
        load_profile(tmp_path / "bad.json")


def test_cli_plan(tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prof = save_profile(PROFILE, tmp_path / "profile.json")
    calib = _calib(tmp_path / "c.jsonl")
    out = tmp_path / "planned"
    code, stdout, err = run_cli("plan", str(tiny_ckpt), "--budget", "80KB", "--latency", "50ms", "--profile", str(prof),
                                "--calib", str(calib), "-o", str(out), capsys=capsys)
    assert code == 0, err
    assert "layer" in stdout and "hot" in stdout and "meets latency: yes (target 50 ms)" in stdout
    assert "routing from importance" in stdout
    assert moeopt.load(out).plan["budget_bytes"] == 80_000
    code, stdout, err = run_cli("plan", str(tiny_ckpt), "--budget", "12 parsecs", capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and "expected a size in bytes" in err
    code, _, err = run_cli("plan", str(tiny_ckpt), "--budget", "1KB", "--profile", str(prof), capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and "minimum is 36864 bytes" in err


def test_packing_time_adds_to_every_miss(tiny_ckpt: Path) -> None:
    """A loaded cold expert is prepacked before it runs: the profile's packing time is part of a miss."""
    from moeopt.passes.plan import build_problem

    model = moeopt.load(tiny_ckpt)
    sizes = slot_bytes(model, None)
    shares = [[1 / len(row)] * len(row) for row in sizes]
    base = build_problem(model, shares, sizes, PROFILE)
    packed = build_problem(model, shares, sizes, {**PROFILE, "pack_s_per_expert": 2e-3})
    for a, b in zip(base.read_s, packed.read_s, strict=True):
        assert b == pytest.approx(tuple(x + 2e-3 for x in a))  # same expert shape as the profile: scale 1
    assert packed.cold_s == base.cold_s and packed.resident_s == base.resident_s
