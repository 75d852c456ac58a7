"""Routing report: JS divergence, per-app frequencies on real (fixture) app texts, files written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import moeopt
from moeopt.passes.calib import load_app_calibration
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


def _routing_freq(model: moeopt.MoEModel, app: str) -> list[torch.Tensor]:
    """Per MoE layer, each expert's share of the routing choices on the app's test split, counted here
    from the router's own choices (not by the report's code)."""
    cs = load_app_calibration(model, app, split="test", max_tokens=512, data_root=FIXTURE_DATA)
    counts = [torch.zeros(layer.router.num_experts) for layer in model.layers]

    def obs(layer: moeopt.MoELayer, trace: object) -> None:
        counts[layer.index] += torch.bincount(trace.index.reshape(-1),  # type: ignore[attr-defined]
                                              minlength=layer.router.num_experts).float()

    for layer in model.layers:
        layer.observers.append(obs)
    with torch.no_grad():
        for batch in cs.batches:
            model.hf(input_ids=batch, use_cache=False)
    for layer in model.layers:
        layer.observers.clear()
    return [c / c.sum() for c in counts]


def _js_bits(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen-Shannon divergence as H(m) - (H(p) + H(q)) / 2, in bits (another formula than the report's)."""
    def h(x: torch.Tensor) -> float:
        x = x.double()[x > 0]
        return float(-(x * x.log2()).sum())

    return h((p + q) / 2) - (h(p) + h(q)) / 2


def test_routing_report_on_fixture_apps(text_ckpt: Path, tmp_path: Path) -> None:
    model = moeopt.load(text_ckpt)
    apps = ["movie-sentiment", "intent", "news-topic"]
    rep = routing_report(model, apps, data_root=FIXTURE_DATA, split="test", max_tokens=512, progress=False)
    assert len(rep["layers"]) == 2
    freq = {a: _routing_freq(model, a) for a in apps}
    for i, layer in enumerate(rep["layers"]):
        assert layer["layer"] == i
        for a in apps:
            assert layer["freq"][a] == pytest.approx(freq[a][i].tolist(), abs=1e-5)  # rounded to 5 places
        assert set(layer["js"]) == {"movie-sentiment|intent", "movie-sentiment|news-topic", "intent|news-topic"}
        for pair, value in layer["js"].items():
            a, b = pair.split("|")
            assert value == pytest.approx(_js_bits(freq[a][i], freq[b][i]), abs=1e-9), pair
        assert layer["mean_js"] == pytest.approx(sum(layer["js"].values()) / 3)
        assert max(layer["js"].values()) > 0  # the apps do route differently
        top2 = {a: set(freq[a][i].topk(2).indices.tolist()) for a in apps}
        assert [d[:2] for d in layer["disjoint_top2"]] == [
            [a, b] for j, a in enumerate(apps) for b in apps[j + 1:] if not top2[a] & top2[b]]
    assert rep["mean_js"] == pytest.approx(sum(layer["mean_js"] for layer in rep["layers"]) / 2)
    assert rep["layers_with_disjoint_top2"] == [la["layer"] for la in rep["layers"] if la["disjoint_top2"]]
    files = write_report(rep, tmp_path / "rep")
    assert all(f.exists() and f.stat().st_size > 0 for f in files)
    assert json.loads(files[0].read_text()) == rep  # the JSON file holds exactly these values


def test_report_cli_rejects_unknown_app(text_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.test_cli import run_cli

    code, _, err = run_cli("report", "routing", str(text_ckpt), "--apps", "movie-sentiment,poetry",
                           "--data", str(FIXTURE_DATA), capsys=capsys)
    assert code == 2 and "unknown app 'poetry'" in err
