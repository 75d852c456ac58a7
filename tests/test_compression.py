"""importance / prune / match / merge: exactness where they must be exact, ILP optimality, bad input."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moeopt
from moeopt.passes import PassManager
from moeopt.passes.match import solve_matching
from moeopt.passes.merge import merge_slots
from moeopt.testing import tiny_model


def _calib(path: Path, n: int, length: int, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    with path.open("w") as f:
        for _ in range(n):
            f.write(json.dumps({"ids": torch.randint(0, 97, (length,), generator=g).tolist()}) + "\n")
    return path


def test_pruning_never_routed_experts_leaves_logits_unchanged(tmp_path: Path) -> None:
    model = moeopt.load(tiny_model("qwen3_moe"))
    calib = _calib(tmp_path / "c.jsonl", 1, 8)  # 8 tokens x top-2 cannot cover 6 experts in every layer
    ids = torch.tensor([json.loads(calib.read_text())["ids"]])
    ref = model.logits(ids)
    # Threshold mode: cold = never routed (share < 1e-9 / E), everything routed is hot.
    report = PassManager(
        f"importance{{calib={calib},seq-len=8,progress=false}},prune{{alpha=0.000000001,beta=0.000000001}}",
        verify_each=True,
    ).run(model)
    assert report.stats[1][1]["experts-removed"] > 0
    assert (model.logits(ids) - ref).abs().max().item() <= 1e-6


def _table_with(w_in: torch.Tensor, w_out: torch.Tensor) -> moeopt.ir.ExpertTable:
    from moeopt.ir.spec import ExpertSpec

    spec = ExpertSpec(hidden=w_out.shape[1], intermediate=w_out.shape[2], act="silu")
    return moeopt.ir.ExpertTable(spec, 2, w_in, w_out)


@pytest.mark.parametrize("method", ["assignment", "ot"])
def test_merging_a_permuted_copy_recovers_the_original(method: str) -> None:
    g = torch.Generator().manual_seed(0)
    h, i = 16, 24
    gate, up, down = torch.randn(i, h, generator=g), torch.randn(i, h, generator=g), torch.randn(h, i, generator=g)
    perm = torch.randperm(i, generator=g)
    w_in = torch.stack([torch.cat([gate, up]), torch.cat([gate[perm], up[perm]])])
    w_out = torch.stack([down, down[:, perm]])
    t = _table_with(w_in, w_out)
    wi, wo, _, _ = merge_slots(t, 0, [1], [0.3, 0.7], method)
    assert torch.equal(wi, w_in[0]) and torch.equal(wo, w_out[0])


def test_merge_with_weights_one_zero_is_the_first_expert() -> None:
    g = torch.Generator().manual_seed(1)
    w_in, w_out = torch.randn(2, 20, 8, generator=g), torch.randn(2, 8, 10, generator=g)
    t = _table_with(w_in, w_out)
    for method in ("assignment", "ot", "none"):
        wi, wo, _, _ = merge_slots(t, 0, [1], [1.0, 0.0], method)
        assert torch.equal(wi, w_in[0]) and torch.equal(wo, w_out[0])


def test_merge_without_alignment_differs_from_aligned() -> None:
    g = torch.Generator().manual_seed(2)
    w_in, w_out = torch.randn(2, 20, 8, generator=g), torch.randn(2, 8, 10, generator=g)
    t = _table_with(w_in, w_out)
    a = merge_slots(t, 0, [1], [1.0, 1.0], "assignment")[0]
    n = merge_slots(t, 0, [1], [1.0, 1.0], "none")[0]
    assert torch.allclose(n, (w_in[0] + w_in[1]) / 2, atol=1e-6) and not torch.allclose(a, n)


def _brute_force(sim: np.ndarray, cap: int) -> float:
    m, h = sim.shape
    best = -np.inf
    for assign in itertools.product(range(h), repeat=m):
        if max(np.bincount(assign, minlength=h)) <= cap:
            best = max(best, sum(sim[i, j] for i, j in enumerate(assign)))
    return float(best)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.integers(0, 10_000))
def test_ilp_matches_brute_force(m: int, h: int, cap: int, seed: int) -> None:
    sim = np.random.default_rng(seed).uniform(-1, 1, size=(m, h))
    if m > cap * h:
        with pytest.raises(moeopt.InfeasibleBudgetError, match="places"):
            solve_matching([sim], [cap])
        return
    rows, objective, status = solve_matching([sim], [cap])
    assert status == "Optimal" and len(rows[0]) == m
    assert max(np.bincount(list(rows[0].values()), minlength=h)) <= cap
    assert objective == pytest.approx(_brute_force(sim, cap), abs=1e-6)


def test_full_litemoe_pipeline_verifies_and_round_trips(tmp_path: Path) -> None:
    model = moeopt.load(tiny_model("deepseek_v3"))  # shared experts, sigmoid groups: merging must keep them
    calib = _calib(tmp_path / "c.jsonl", 16, 64)
    text = (f"importance{{calib={calib},seq-len=32,progress=false}},prune{{keep=0.5,cold=0.25}},"
            "match{similarity=output},merge{align=ot},canonicalize")
    report = PassManager(text, verify_each=True).run(model)
    # 8 experts per MoE layer: 4 hot, 2 moderate (merged), 2 cold
    assert dict(report.stats)["merge"]["experts-merged"] == 2 * len(model.layers)
    assert all(layer.table.num_slots == 4 for layer in model.layers)
    assert all(len(layer.shared) == 1 for layer in model.layers)
    model.save(tmp_path / "ck")
    again = moeopt.load(tmp_path / "ck")
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    assert torch.equal(again.logits(ids), model.logits(ids))
    assert again.history == [text]
    states = [again.layers[0].table.state(e) for e in range(8)]
    assert states.count("kept") == 4 and states.count("merged") == 2 and states.count("pruned") == 2


@pytest.mark.parametrize("method", ["random", "magnitude"])
def test_data_free_baselines_keep_the_requested_share(method: str) -> None:
    model = moeopt.load(tiny_model("mixtral"))
    PassManager(f"prune{{method={method},keep=0.5}}", verify_each=True).run(model)
    assert all(layer.table.num_slots == 2 for layer in model.layers)


def test_magnitude_keeps_the_largest_experts() -> None:
    model = moeopt.load(tiny_model("mixtral"))
    t = model.layers[0].table
    with torch.no_grad():
        t.w_in[3].mul_(10)
        t.w_in[1].mul_(5)
    PassManager("prune{method=magnitude,keep=0.5}").run(model)
    assert sorted(s.members[0] for s in t.slots) == [1, 3]


@pytest.mark.parametrize(
    ("pipeline", "error", "fragment"),
    [
        ("prune{alpha=0.5}", moeopt.BadInputError, "give both alpha and beta"),
        ("prune{alpha=2,beta=1}", moeopt.BadInputError, "must not exceed beta"),
        ("prune{keep=0.8,cold=0.5}", moeopt.BadInputError, "exceeds 1"),
        ("prune{keep=1.5}", moeopt.BadInputError, "must be in [0, 1]"),
        ("prune{method=frequency}", moeopt.BadInputError, "run `importance{calib=...}` first"),
        ("match{similarity=cosine}", moeopt.BadInputError, "expects one of router|output|weight, got 'cosine'"),
        ("match", moeopt.BadInputError, "needs the hot/moderate classes of `prune`"),
        ("merge", moeopt.BadInputError, "needs the pairs of `match`"),
        ("importance", moeopt.BadInputError, "importance needs calibration data"),
        ("prune{method=random,keep=0.5,cold=0.25},match{similarity=weight},merge", moeopt.BadInputError,
         "merge{weight=freq} needs routing statistics"),
    ],
)
def test_bad_options_and_missing_prerequisites(pipeline: str, error: type[Exception], fragment: str) -> None:
    model = moeopt.load(tiny_model("mixtral"))
    with pytest.raises(error) as info:
        PassManager(pipeline).run(model)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_uniform_merge_needs_no_importance_and_is_the_plain_mean() -> None:
    """merge{weight=uniform} runs without routing statistics (unlike freq, above) and, unaligned, each
    merged slot is the unweighted mean of its members' original weights."""
    model = moeopt.load(tiny_model("mixtral"))  # 4 experts, top-2: 2 hot, 1 moderate, 1 cold
    w_in = [layer.table.w_in.clone() for layer in model.layers]
    w_out = [layer.table.w_out.clone() for layer in model.layers]
    report = PassManager("prune{method=random,keep=0.5,cold=0.25},match{similarity=weight},"
                         "merge{weight=uniform,align=none}", verify_each=True).run(model)
    assert dict(report.stats)["merge"]["experts-merged"] == len(model.layers)
    for layer, wi, wo in zip(model.layers, w_in, w_out, strict=True):
        t = layer.table
        merged = [s for s, info in enumerate(t.slots) if len(info.members) == 2]
        assert len(merged) == 1 and t.num_slots == 2
        members = list(t.slots[merged[0]].members)
        torch.testing.assert_close(t.w_in[merged[0]], wi[members].mean(0), rtol=0, atol=1e-6)
        torch.testing.assert_close(t.w_out[merged[0]], wo[members].mean(0), rtol=0, atol=1e-6)


def test_empty_and_malformed_calibration(tmp_path: Path) -> None:
    model = moeopt.load(tiny_model("mixtral"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(moeopt.BadInputError, match=r"calibration file .* is empty"):
        PassManager(f"importance{{calib={tmp_path / 'empty.jsonl'}}}").run(model)
    (tmp_path / "bad.jsonl").write_text('{"words": 1}\n')
    with pytest.raises(moeopt.BadInputError, match="needs a 'text' or 'ids' field"):
        PassManager(f"importance{{calib={tmp_path / 'bad.jsonl'}}}").run(model)
    (tmp_path / "text.jsonl").write_text('{"text": "no tokenizer here"}\n')
    with pytest.raises(moeopt.BadInputError, match=r"need the model's tokenizer\.json"):
        PassManager(f"importance{{calib={tmp_path / 'text.jsonl'}}}").run(model)
    with pytest.raises(moeopt.BadInputError, match="no such calibration file"):
        PassManager(f"importance{{calib={tmp_path / 'missing.jsonl'}}}").run(model)


def test_infeasible_capacity(tmp_path: Path) -> None:
    model = moeopt.load(tiny_model("qwen3_moe"))  # 6 experts: 2 hot (top-2), 4 moderate, 2 places
    with pytest.raises(moeopt.InfeasibleBudgetError, match="capacity 1"):
        PassManager("prune{method=random,keep=0.25,cold=0},match{similarity=weight,capacity=1}").run(model)


def test_per_app_importance(tmp_path: Path) -> None:
    model = moeopt.load(tiny_model("mixtral"))
    a, b = _calib(tmp_path / "a.jsonl", 4, 40, seed=1), _calib(tmp_path / "b.jsonl", 4, 40, seed=2)
    pm = PassManager(f"importance{{calib={a};{b},seq-len=16,progress=false}}")
    pm.run(model)
    imp = pm.ctx.analyses.peek("importance")
    assert set(imp.per_app) == {"a", "b"}
    total = imp.per_app["a"][0].counts + imp.per_app["b"][0].counts
    assert torch.equal(imp.layers[0].counts, total)
    assert float(imp.layers[0].freq.sum()) == pytest.approx(1.0)
    assert [s.importance for s in model.layers[0].table.slots] == pytest.approx(imp.layers[0].freq.tolist())
