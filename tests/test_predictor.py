"""The routing predictor: trains, reports recall, round-trips with the checkpoint, estimates importance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import moeopt
from moeopt.passes import PassManager
from moeopt.passes.predictor import topk_recall
from moeopt.testing import tiny_model


def _calib(path: Path, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    path.write_text("".join(json.dumps({"ids": torch.randint(0, 97, (64,), generator=g).tolist()}) + "\n"
                            for _ in range(12)))
    return path


def test_topk_recall() -> None:
    true = torch.tensor([[5.0, 4.0, 0.0, 0.0], [0.0, 0.0, 2.0, 3.0]])
    assert topk_recall(true, true, 2) == 1.0
    assert topk_recall(torch.tensor([[5.0, 0.0, 4.0, 0.0], [0.0, 1.0, 0.0, 3.0]]), true, 2) == 0.5


def test_predictor_trains_attaches_and_round_trips(tmp_path: Path) -> None:
    model = moeopt.load(tiny_model("olmoe"))
    calib = _calib(tmp_path / "c.jsonl")
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(1))
    ref = model.logits(ids)
    report = PassManager(f"predictor{{calib={calib},seq-len=32,steps=50}}", verify_each=True).run(model)
    stats = report.stats[0][1]
    assert 0.0 <= stats["recall@2-layer1"] <= 1.0 and stats["params"] > 0
    assert torch.equal(model.logits(ids), ref)  # attaching a predictor changes no output
    model.save(tmp_path / "ck")
    again = moeopt.load(tmp_path / "ck")
    assert again.predictor is not None
    x = torch.randn(5, 6)
    assert torch.equal(again.predictor(x)[0], model.predictor(x)[0])  # type: ignore[misc]


def test_importance_from_predictor_runs_only_the_first_router(tmp_path: Path) -> None:
    model = moeopt.load(tiny_model("mixtral"))
    calib = _calib(tmp_path / "c.jsonl")
    PassManager(f"predictor{{calib={calib},seq-len=32,steps=30}}").run(model)
    calls = []
    model.layers[1].observers.append(lambda layer, trace: calls.append(1))
    pm = PassManager(f"importance{{calib={calib},seq-len=32,estimator=predictor,progress=false}}")
    pm.run(model)
    assert calls == []  # layer 1 never ran
    imp = pm.ctx.analyses.peek("importance")
    assert float(imp.layers[1].freq.sum()) == pytest.approx(1.0)


def test_predictor_errors(tmp_path: Path) -> None:
    model = moeopt.load(tiny_model("mixtral"))
    calib = _calib(tmp_path / "c.jsonl")
    with pytest.raises(moeopt.BadInputError, match="needs a routing predictor"):
        PassManager(f"importance{{calib={calib},estimator=predictor}}").run(model)
    with pytest.raises(moeopt.BadInputError, match="needs calibration data"):
        PassManager("predictor").run(model)


def test_missing_predictor_file_is_refused(tmp_path: Path) -> None:
    model = moeopt.load(tiny_model("mixtral"))
    PassManager(f"predictor{{calib={_calib(tmp_path / 'c.jsonl')},seq-len=32,steps=5}}").run(model)
    model.save(tmp_path / "ck")
    (tmp_path / "ck" / "predictor.safetensors").unlink()
    with pytest.raises(moeopt.BadInputError, match=r"predictor\.safetensors is missing"):
        moeopt.load(tmp_path / "ck")
