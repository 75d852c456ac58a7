"""`lower` runs what it wrote in onnxruntime before renaming it into place, and refuses a wrong graph.

The graph is the shared tiny Mixtral artifact's, copied in place of the export (seconds, not the minute
of a real export): once as it is, once with one router weight changed, as a wrong lowering would write it.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
import torch
from onnx import numpy_helper

import moeopt.lower.artifact as artifact_mod
from moeopt.errors import VerificationError
from moeopt.ir.model import MoEModel
from moeopt.lower import lower
from moeopt.lower.artifact import PARITY_TOL_EXACT
from moeopt.lower.decoder import CacheLayout
from moeopt.lower.export import ExportedDecoder
from moeopt.runtime import Session
from tests.lower_helpers import artifact, manifest, source_model, tiny
from tests.test_cli import run_cli


def _copy_export(src: Path, fault: bool) -> Callable[..., ExportedDecoder]:
    """An `export_decoder` that writes `src`'s graph, with layer 0's router weight for expert 0 shifted."""
    m = manifest(src)
    g, c = m["graph"], m["graph"]["kv_cache"]

    def export(model: MoEModel, onnx_path: Path, *, kv_cache: bool = True, attention: str = "") -> ExportedDecoder:
        router_shape = [model.config.hidden_size, model.layers[0].router.num_experts]
        if not fault:
            for name in ("model.onnx", "model.onnx.data"):
                shutil.copy2(src / name, onnx_path.parent / name)
        else:
            graph = onnx.load(str(src / "model.onnx"))
            routers = [t for t in graph.graph.initializer if list(t.dims) == router_shape]  # (H, E), one a layer
            assert len(routers) == len(m["layers"])
            w = numpy_helper.to_array(routers[0]).copy()
            w[:, 0] += 1.0
            routers[0].CopyFrom(numpy_helper.from_array(w, routers[0].name))
            onnx.save(graph, str(onnx_path), save_as_external_data=True, location=onnx_path.name + ".data")
        cache = CacheLayout(c["num_layers"], c["key_heads"], c["key_dim"], c["value_heads"], c["value_dim"])
        return ExportedDecoder(g["inputs"], g["outputs"], cache, g["moe_nodes"], g["dense_moe_layers"], 0)

    return export


@pytest.fixture
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return artifact("mixtral", tmp_path_factory)


def test_a_wrong_graph_is_refused_and_nothing_is_written(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    model = source_model("mixtral", src)
    monkeypatch.setattr(artifact_mod, "export_decoder", _copy_export(src, fault=True))
    out = tmp_path / "art"
    tol = re.escape(f"over its tolerance {PARITY_TOL_EXACT:g}; nothing was written")
    with pytest.raises(VerificationError, match=r"differs from the model in PyTorch by [0-9.e+-]+ .*" + tol) as err:
        lower(model, out)
    measured = float(str(err.value).split(" by ")[1].split()[0])
    assert measured > 2 * PARITY_TOL_EXACT  # 0.008: one router row moves the routing of many tokens
    assert list(tmp_path.iterdir()) == []  # no output folder, no temporary folder
    ckpt = src.parent / "mixtral-ckpt"  # the checkpoint `src` was lowered from
    code, _, text = run_cli("lower", str(ckpt), "-o", str(out), capsys=capsys)
    lines = text.strip().splitlines()
    assert code == 2 and len(lines) == 1 and f"over its tolerance {PARITY_TOL_EXACT:g}" in lines[0], text
    assert list(tmp_path.iterdir()) == []
    code, printed, _ = run_cli("lower", str(ckpt), "-o", str(out), "--no-verify", capsys=capsys)
    assert code == 0 and "not verified" in printed
    m = manifest(out)
    assert m["verified"] is False and m["parity_measured"] is None
    Session(out)  # the manifest still lists every file's sha256


def test_a_verified_artifact_records_its_parity_and_overwrite_replaces_only_moeopts(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = src.parent / "mixtral-ckpt"
    out = tmp_path / "art"
    monkeypatch.setattr(artifact_mod, "export_decoder", _copy_export(src, fault=False))
    code, printed, err = run_cli("lower", str(ckpt), "-o", str(out), capsys=capsys)
    assert code == 0 and "(verified: max |logit diff|" in printed, err
    m = manifest(out)
    assert m["verified"] is True and 0 <= m["parity_measured"] <= m["parity_tolerance"] == PARITY_TOL_EXACT
    Session(out)  # the rewritten manifest's hashes still hold
    before = (out / "manifest.json").read_text()
    code, _, err = run_cli("lower", str(ckpt), "-o", str(out), capsys=capsys)
    assert code == 2 and "not empty; give --overwrite" in err and (out / "manifest.json").read_text() == before
    monkeypatch.setattr(artifact_mod, "export_decoder", _copy_export(src, fault=True))
    code, _, err = run_cli("lower", str(ckpt), "-o", str(out), "--overwrite", capsys=capsys)
    assert code == 2 and "over its tolerance" in err
    assert (out / "manifest.json").read_text() == before  # the old artifact stays when the new one is refused
    code, _, err = run_cli("lower", str(ckpt), "-o", str(out), "--overwrite", "--no-verify", capsys=capsys)
    assert code == 0 and json.loads((out / "manifest.json").read_text())["verified"] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no temporary or old folder left


def test_a_graph_without_kv_cache_is_verified_by_full_recompute(tmp_path: Path) -> None:
    out = lower(tiny("mixtral"), tmp_path / "art", kv_cache=False)
    m = manifest(out)
    assert m["graph"]["kv_cache"] is None
    assert m["verified"] is True and 0 <= m["parity_measured"] <= m["parity_tolerance"]


def test_encoder_decoder_artifacts_are_measured_against_pytorch(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Switch has no parity.npz (its prompt feeds the encoder): the check runs a PyTorch forward instead."""
    from moeopt.lower.parity import measure_parity

    art = artifact("switch_transformers", tmp_path_factory)
    m = manifest(art)
    assert m["encoder"] and m["verified"] is True and 0 <= m["parity_measured"] <= PARITY_TOL_EXACT
    for layer in (0, -1):  # an encoder MoE layer, a decoder one: a model the graph does not match
        model = source_model("switch_transformers", art)
        with torch.no_grad():
            model.layers[layer].router_weight[0] += 1.0
        assert measure_parity(art, model) > 10 * PARITY_TOL_EXACT, layer
