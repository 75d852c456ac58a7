"""Running artifacts: manifest checks (corrupted / truncated refused), atomic lowering, ORT-optimised
graphs, sampling and streaming, the CLI, and the numpy + onnxruntime-only script."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import moeopt
from moeopt.errors import BadInputError, UnsupportedModelError
from moeopt.lower import artifact as artifact_mod
from moeopt.lower import lower
from moeopt.lower.profiles import profile
from moeopt.passes import PassManager
from moeopt.runtime import Sampler, Session
from moeopt.testing import tiny_model
from tests.conftest import FIXTURE_DATA
from tests.lower_helpers import artifact, left_padded_batch, tiny
from tests.test_cli import run_cli

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "run_artifact.py"


@pytest.fixture()
def art_copy(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the tiny Mixtral artifact, free to damage."""
    dest = tmp_path / "art"
    shutil.copytree(artifact("mixtral", tmp_path_factory), dest)
    return dest


def test_corrupted_or_truncated_files_are_refused(art_copy: Path) -> None:
    data = art_copy / "model.onnx.data"
    good = data.read_bytes()
    raw = bytearray(good)
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(BadInputError, match=r"model\.onnx\.data: corrupted") as e:
        Session(art_copy)
    assert "\n" not in str(e.value)
    data.write_bytes(bytes(raw[:100]))
    with pytest.raises(BadInputError, match=r"model\.onnx\.data: truncated"):
        Session(art_copy)
    data.write_bytes(good)
    Session(art_copy)
    (art_copy / "parity.npz").unlink()
    with pytest.raises(BadInputError, match=r"parity\.npz: missing"):
        Session(art_copy)
    (art_copy / "manifest.json").write_text("{not json")
    with pytest.raises(BadInputError, match="corrupt manifest"):
        Session(art_copy)
    (art_copy / "manifest.json").unlink()
    with pytest.raises(BadInputError, match="not a moeopt artifact"):
        Session(art_copy)


def test_cli_refuses_a_damaged_artifact_in_one_line(art_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = art_copy / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-7])
    for argv in (("run", str(art_copy), "--ids", "1,2"),
                 ("eval", str(art_copy), "--data", str(FIXTURE_DATA), "--ppl", "news", "--tasks", "")):
        code, _, err = run_cli(*argv, capsys=capsys)
        assert code == 2 and "model.onnx.data: truncated" in err and len(err.strip().splitlines()) == 1, argv


def test_failed_lowering_leaves_no_folder_and_keeps_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(model: object, path: Path, **kw: object) -> None:
        path.write_bytes(b"half a model")
        raise RuntimeError("export exploded")

    monkeypatch.setattr(artifact_mod, "export_decoder", boom)
    out = tmp_path / "art"
    with pytest.raises(RuntimeError, match="export exploded"):  # the export's own failure, not another
        lower(tiny("mixtral"), out)
    assert list(tmp_path.iterdir()) == []
    out.mkdir()
    old = json.dumps({"format": "moeopt-artifact", "version": 1})  # an artifact moeopt wrote earlier
    (out / "manifest.json").write_text(old)
    with pytest.raises(RuntimeError, match="export exploded"):  # the export's own failure, not another
        lower(tiny("mixtral"), out, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["art"] and (out / "manifest.json").read_text() == old


def test_unlowerable_models_are_refused_cleanly(tmp_path: Path) -> None:
    from moeopt.ir.table import QuantizedMatrix

    with pytest.raises(UnsupportedModelError, match="float32"):
        lower(moeopt.load(tiny_model("mixtral"), dtype=torch.float16), tmp_path / "half")
    model = tiny("mixtral")
    z = torch.zeros(1, dtype=torch.uint8)
    model.layers[1].table.quantized["0_w_in"] = QuantizedMatrix(96, 32, 4, 16, True, z, torch.ones(1), None)
    with pytest.raises(UnsupportedModelError, match="layer 1 slot 0: a packed w_in but the slot is float"):
        lower(model, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []


def test_lower_pass_options_and_text() -> None:
    pm = PassManager("lower{out=some/dir,target=arm64,opt-level=extended}")
    assert pm.pipeline.text() == "lower{out=some/dir,target=arm64,opt-level=extended}"
    with pytest.raises(BadInputError, match="out=FOLDER"):
        PassManager("lower").run(tiny("mixtral"))
    assert profile("arm64").to_dict()["config"]["session.intra_op.allow_spinning"] == "0"
    with pytest.raises(BadInputError, match="unknown target"):
        profile("riscv")


def test_ort_optimised_graph_matches(art_copy: Path) -> None:
    ids, mask = left_padded_batch([7, 3], seed=9)
    ref = Session(art_copy).generate(ids, 8, attention_mask=mask, stop_tokens=(), keep_logits=True)
    artifact_mod.optimize_offline(art_copy / "model.onnx", profile("x86_64"))
    opt = Session(art_copy, verify=False)
    g = opt.generate(ids, 8, attention_mask=mask, stop_tokens=(), keep_logits=True)
    assert np.array_equal(g.sequences, ref.sequences)
    # Same machine, same kernels; only ORT's fusions differ: measured 0.0 (bit-identical logits).
    assert np.abs(np.stack(g.step_logits) - np.stack(ref.step_logits)).max() <= 1e-5


def test_sampling_stop_tokens_and_streaming(tmp_path_factory: pytest.TempPathFactory) -> None:
    sess = Session(artifact("mixtral", tmp_path_factory))
    ids = np.array([[5, 6, 7, 8]])
    greedy = sess.generate(ids, 6, stop_tokens=())
    assert np.array_equal(sess.generate(ids, 6, sampler=Sampler(True, top_k=1, seed=0), stop_tokens=()).sequences,
                          greedy.sequences)
    a = sess.generate(ids, 6, sampler=Sampler(True, temperature=1.5, top_p=0.9, seed=3), stop_tokens=())
    b = sess.generate(ids, 6, sampler=Sampler(True, temperature=1.5, top_p=0.9, seed=3), stop_tokens=())
    assert np.array_equal(a.sequences, b.sequences)
    seen: list[int] = []
    first = int(greedy.sequences[0, 4])
    g = sess.generate(ids, 6, stop_tokens=(first,), on_token=lambda step, tok: seen.append(int(tok[0])))
    assert g.new_tokens == 1 and seen == [first]
    with pytest.raises(BadInputError):
        Sampler(True, temperature=0)


def test_cli_run_and_lower_errors(tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]) -> None:
    art = artifact("mixtral", tmp_path_factory)
    code, out, _ = run_cli("run", str(art), "--ids", "1,2,3", "--max-new-tokens", "5", capsys=capsys)
    assert code == 0 and "decode" in out and "tok/s" in out
    code, out, _ = run_cli("run", str(art), "--prompt", "w1 w2 w3", "--max-new-tokens", "4", capsys=capsys)
    assert code == 0 and out.startswith("w1 w2 w3") and "4 tokens" in out
    code, _, err = run_cli("run", str(art), "--ids", "1,500", capsys=capsys)
    assert code == 2 and "outside the vocabulary" in err
    code, _, err = run_cli("lower", str(art), "-o", str(art.parent / "x"), "--target", "riscv", capsys=capsys)
    assert code == 2 and "riscv" in err and len(err.strip().splitlines()) == 1


def test_standalone_script_imports_only_numpy_and_onnxruntime(
    tmp_path_factory: pytest.TempPathFactory, art_copy: Path
) -> None:
    tree = ast.parse(SCRIPT.read_text())
    mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert mods - set(sys.stdlib_module_names) == {"numpy", "onnxruntime"}
    art = artifact("mixtral", tmp_path_factory)
    assert json.loads((art / "manifest.json").read_text())["parity_tolerance"] == 1e-3  # float: exact kernels
    # -I: isolated, so the repository (moeopt) is not importable from the working directory
    res = subprocess.run([sys.executable, "-I", str(SCRIPT), str(art), "--parity"], capture_output=True, text=True)
    assert res.returncode == 0 and "tokens identical" in res.stdout, res.stderr
    (art_copy / "model.onnx.data").write_bytes(b"x")
    res = subprocess.run([sys.executable, "-I", str(SCRIPT), str(art_copy), "--parity"], capture_output=True, text=True)
    assert res.returncode == 2 and "model.onnx.data" in res.stderr
