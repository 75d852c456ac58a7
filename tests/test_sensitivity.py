"""sensitivity: the leave-one-out loss rise per expert, and prune / merge ranking and weighting by it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import FIXTURE_DATA

import moeopt
from moeopt.data.apps import APPS, app_split
from moeopt.passes import PassContext, PassManager
from moeopt.passes.merge import merge_slots
from moeopt.testing import tiny_model


def _ids_calib(path: Path, n: int, length: int, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    path.write_text("".join(json.dumps({"ids": torch.randint(0, 97, (length,), generator=g).tolist()}) + "\n"
                            for _ in range(n)))
    return path


def _lm_loss(model: moeopt.MoEModel, ids: torch.Tensor) -> float:
    logits = model.logits(ids).float()
    return float(F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()))


def test_text_sensitivity_is_the_loss_rise_and_zero_for_unrouted_experts(tmp_path: Path) -> None:
    model = moeopt.load(tiny_model("qwen3_moe"))  # 6 experts, top-2
    calib = _ids_calib(tmp_path / "c.jsonl", 1, 8)  # 8 tokens cannot reach every expert of every layer
    ids = torch.tensor([json.loads(calib.read_text())["ids"]])
    pm = PassManager(f"importance{{calib={calib},seq-len=8,progress=false}},"
                     f"sensitivity{{calib={calib},seq-len=8,progress=false}}")
    pm.run(model)
    imp, sens = pm.ctx.analyses.peek("importance"), pm.ctx.analyses.peek("sensitivity")
    base = _lm_loss(model, ids)
    assert sens.losses["c"] == pytest.approx(base, abs=1e-6)
    unrouted = 0
    for i, layer in enumerate(model.layers):
        for e in range(layer.table.num_experts):
            if imp.layers[i].counts[e] == 0:  # masking an expert nobody chose changes nothing
                assert float(sens.layers[i][e]) == 0.0
                unrouted += 1
            else:  # recomputed independently: the loss with that expert masked, minus the base loss
                layer.table.keep_mask[e] = False
                rise = _lm_loss(model, ids) - base
                layer.table.keep_mask[e] = True
                assert float(sens.layers[i][e]) == pytest.approx(rise, abs=1e-5)
    assert unrouted > 0
    assert any(float(r.abs().max()) > 1e-4 for r in sens.layers)


def test_app_sensitivity_scores_the_gold_label(text_ckpt: Path) -> None:
    from moeopt.eval.classify import app_accuracy
    from moeopt.passes.calib import load_tokenizer

    model = moeopt.load(text_ckpt)
    ctx = PassContext(data_root=FIXTURE_DATA)
    pm = PassManager("sensitivity{calib=app:movie-sentiment,rows=6,progress=false}", ctx=ctx)
    report = pm.run(model)
    rows = app_split(FIXTURE_DATA, "movie-sentiment", "train")[:6]
    gold = app_accuracy(model.hf, load_tokenizer(model), APPS["movie-sentiment"], rows, progress=False)["gold_nll"]
    assert report.stats[0][1]["loss[movie-sentiment]"] == pytest.approx(gold, abs=1e-4)
    assert pm.ctx.analyses.peek("sensitivity").losses["movie-sentiment"] == pytest.approx(gold, abs=1e-9)


def test_prune_and_merge_by_loss(tmp_path: Path) -> None:
    """merge{weight=loss} averages each hot/moderate pair with the measured loss rises as weights (not the
    routing frequencies), and drops the sensitivity analysis it made stale."""
    model = moeopt.load(tiny_model("mixtral"))  # 4 experts, top-2
    calib = _ids_calib(tmp_path / "c.jsonl", 4, 32)
    ctx = PassContext()
    PassManager(f"importance{{calib={calib},seq-len=32,progress=false}},"
                f"sensitivity{{calib={calib},seq-len=32,progress=false}},"
                "prune{keep=0.5,cold=0.25,score=loss},match", verify_each=True, ctx=ctx).run(model)
    scores = [ctx.analyses.peek("sensitivity").score(i) for i in range(len(model.layers))]
    freq = [layer.freq for layer in ctx.analyses.peek("importance").layers]
    pairs = ctx.analyses.peek("matching").assignment
    tables = [copy.deepcopy(layer.table) for layer in model.layers]
    report = PassManager("merge{weight=loss},canonicalize", verify_each=True, ctx=ctx).run(model)
    assert ctx.analyses.peek("sensitivity") is None  # merge changed the experts: the measured rises are stale
    assert dict(report.stats)["merge"]["experts-merged"] == len(model.layers)
    for i, (layer, t0) in enumerate(zip(model.layers, tables, strict=True)):
        ((m, h),) = pairs[i].items()
        slots = [int(t0.slot_of[h]), int(t0.slot_of[m])]
        want = merge_slots(t0, slots[0], slots[1:], [float(scores[i][h]), float(scores[i][m])], "assignment")
        by_freq = merge_slots(t0, slots[0], slots[1:], [float(freq[i][h]), float(freq[i][m])], "assignment")
        got = int(layer.table.slot_of[h])
        assert int(layer.table.slot_of[m]) == got
        assert torch.equal(layer.table.w_in[got], want[0]) and torch.equal(layer.table.w_out[got], want[1])
        assert not torch.allclose(want[0], by_freq[0])  # the two weightings really differ here
    model.save(tmp_path / "ck")
    assert torch.equal(moeopt.load(tmp_path / "ck").logits(torch.tensor([[1, 2, 3]])),
                       model.logits(torch.tensor([[1, 2, 3]])))


def test_prune_keeps_the_experts_whose_removal_hurts_most(tmp_path: Path) -> None:
    model = moeopt.load(tiny_model("mixtral"))
    calib = _ids_calib(tmp_path / "c.jsonl", 4, 32)
    pm = PassManager(f"sensitivity{{calib={calib},seq-len=32,progress=false}},prune{{keep=0.5,score=loss}}")
    pm.run(model)
    rises = pm.ctx.analyses.peek("sensitivity").layers
    for layer, rise in zip(model.layers, rises, strict=True):
        top = sorted(range(rise.numel()), key=lambda e: (-float(rise[e]), e))[:2]
        assert sorted(s.members[0] for s in layer.table.slots) == sorted(top)


@pytest.mark.parametrize(
    ("pipeline", "fragment"),
    [
        ("prune{keep=0.5,score=loss}", "prune{score=loss} needs loss sensitivities: run `sensitivity{calib=...}`"),
        ("prune{method=random,keep=0.5,cold=0.25},match{similarity=weight},merge{weight=loss}",
         "merge{weight=loss} needs loss sensitivities"),
        ("sensitivity", "sensitivity needs calibration data"),
        ("sensitivity{calib=app:nope}", "unknown app 'nope'"),
        ("sensitivity{rows=0,calib=app:intent}", "rows"),
    ],
)
def test_sensitivity_errors(pipeline: str, fragment: str) -> None:
    model = moeopt.load(tiny_model("mixtral"))
    with pytest.raises(moeopt.MoeOptError) as info:
        PassManager(pipeline, ctx=PassContext(data_root=FIXTURE_DATA)).run(model)
    assert fragment in str(info.value) and "\n" not in str(info.value)
