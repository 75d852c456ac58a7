"""The demo's deploy stage: its pipeline text, its output folder rules, and the quantize calibration it needs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FIXTURE_DATA

import moeopt
from moeopt.data.apps import APPS
from moeopt.demo import DEMO_DATA
from moeopt.demo_deploy import calib_specs, deploy_pipeline
from moeopt.errors import BadInputError
from moeopt.outdir import check_out_dir
from moeopt.passes import PassContext, PassManager, parse_pipeline


def test_rerun_replaces_only_what_moeopt_wrote(tmp_path: Path) -> None:
    """The demo writes with overwrite (moeopt.outdir's rule): its own earlier outputs go, a user's folder stays."""
    ours = tmp_path / "artifact"
    ours.mkdir()
    (ours / "manifest.json").write_text(json.dumps({"format": "moeopt-artifact", "version": 1}))
    (ours / "model.onnx").write_bytes(b"x")
    check_out_dir(ours, overwrite=True)

    theirs = tmp_path / "notes"
    theirs.mkdir()
    (theirs / "todo.txt").write_text("mine")
    with pytest.raises(BadInputError, match="not a folder moeopt wrote"):
        check_out_dir(theirs, overwrite=True)
    assert (theirs / "todo.txt").read_text() == "mine"

    empty = tmp_path / "empty"
    empty.mkdir()
    check_out_dir(empty, overwrite=True)
    check_out_dir(tmp_path / "absent", overwrite=True)
    lower = parse_pipeline(deploy_pipeline(["app:intent"], ours)).elements[-1].raw()
    assert lower["overwrite"] == "true"  # the artifact of an earlier run is replaced once the new one is complete


def test_deploy_pipeline_compresses_quantizes_under_a_budget_and_lowers_for_arm64(tmp_path: Path) -> None:
    calib = calib_specs(DEMO_DATA, list(APPS))
    assert calib[: len(APPS)] == [f"app:{a}" for a in APPS]
    assert calib[-1].endswith("lm/news/train.jsonl")  # plain text too: the artifact is judged on perplexity
    out = tmp_path / "my out"  # a space: the path must be quoted in the pipeline text
    passes = parse_pipeline(deploy_pipeline(calib, out)).elements
    names = [p.name for p in passes]
    assert names == ["layer-io", "importance", "prune", "match", "merge", "canonicalize", "refit", "quantize", "lower"]
    quant, lower = passes[-2].raw(), passes[-1].raw()
    assert quant["budget"] == "1.75MB" and "method" not in quant  # the ILP (the default), under a byte budget
    assert quant["candidates"] == "2;4"
    assert lower == {"out": str(out), "target": "arm64", "overwrite": "true"}
    assert passes[1].raw()["calib"].split(";") == calib


def test_quantize_reads_app_calibration_from_the_pipelines_data_root(
    text_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The demo runs on a fresh clone, where no prepared data exists: quantize must read --data, as importance does.
    monkeypatch.setenv("MOEOPT_DATA", str(tmp_path / "nothing-prepared"))
    model = moeopt.load(text_ckpt)
    pm = PassManager("quantize{avg-bits=3,candidates=2;4,calib=app:intent,calib-tokens=256,seq-len=32}",
                     ctx=PassContext(data_root=FIXTURE_DATA))
    pm.run(model)
    bits = {s.bits for layer in model.layers for s in layer.table.slots}
    assert bits <= {2, 4} and bits
    with pytest.raises(BadInputError):
        PassManager("quantize{avg-bits=3,calib=app:intent,calib-tokens=256,seq-len=32}").run(moeopt.load(text_ckpt))
