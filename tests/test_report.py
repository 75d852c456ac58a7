"""Routing report: JS divergence, per-app frequencies on real (fixture) app texts, files written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import moeopt
from moeopt.report import js_divergence, routing_report, write_report
from tests.conftest import FIXTURE_DATA


def test_js_divergence_bounds() -> None:
    p = torch.tensor([0.5, 0.5, 0.0, 0.0])
    q = torch.tensor([0.0, 0.0, 0.5, 0.5])
    assert js_divergence(p, p) == 0.0
    assert js_divergence(p, q) == pytest.approx(1.0)
    r = torch.tensor([0.7, 0.1, 0.1, 0.1])
    assert js_divergence(p, r) == pytest.approx(js_divergence(r, p))
    assert 0.0 < js_divergence(p, r) < 1.0


def test_routing_report_on_fixture_apps(text_ckpt: Path, tmp_path: Path) -> None:
    model = moeopt.load(text_ckpt)
    apps = ["movie-sentiment", "intent", "news-topic"]
    rep = routing_report(model, apps, data_root=FIXTURE_DATA, split="test", max_tokens=512, progress=False)
    assert len(rep["layers"]) == 2
    for layer in rep["layers"]:
        for a in apps:
            assert sum(layer["freq"][a]) == pytest.approx(1.0, abs=1e-3)
        assert set(layer["js"]) == {"movie-sentiment|intent", "movie-sentiment|news-topic", "intent|news-topic"}
    files = write_report(rep, tmp_path / "rep")
    assert all(f.exists() and f.stat().st_size > 0 for f in files)


def test_report_cli_rejects_unknown_app(text_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.test_cli import run_cli

    code, _, err = run_cli("report", "routing", str(text_ckpt), "--apps", "movie-sentiment,poetry",
                           "--data", str(FIXTURE_DATA), capsys=capsys)
    assert code == 2 and "unknown app 'poetry'" in err
