"""Output folders: a user's files are never replaced; --overwrite replaces only a folder moeopt wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import moeopt
from moeopt.errors import BadInputError
from moeopt.outdir import MARKERS, atomic_dir, check_out_dir, commit_dir, written_by_moeopt
from tests.test_cli import one_line_exit_2, run_cli


def _user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text("years of work")
    return path


def test_markers_are_the_formats_moeopt_writes() -> None:
    from moeopt.data import smollm2
    from moeopt.ir import checkpoint
    from moeopt.runtime import manifest
    from moeopt.tune import meta

    assert MARKERS == {manifest.MANIFEST: manifest.FORMAT, checkpoint.META_FILE: checkpoint.FORMAT,
                       meta.META_FILE: meta.FORMAT, smollm2.MARKER: smollm2.FORMAT}


def test_only_a_folder_moeopt_wrote_is_replaced(tmp_path: Path) -> None:
    check_out_dir(tmp_path / "new", overwrite=False)  # absent: fine
    (tmp_path / "empty").mkdir()
    check_out_dir(tmp_path / "empty", overwrite=False)  # empty: fine
    user = _user_folder(tmp_path / "user")
    for overwrite, fragment in ((False, "not empty; give --overwrite"), (True, "not a folder moeopt wrote")):
        with pytest.raises(BadInputError, match=fragment):
            atomic_dir(user, overwrite=overwrite)
    (user / "manifest.json").write_text(json.dumps({"format": "something-else"}))  # a marker's name is not enough
    assert not written_by_moeopt(user)
    with pytest.raises(BadInputError, match="not a folder moeopt wrote"):
        check_out_dir(user, overwrite=True)
    assert (user / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "user"]  # no temporary folder was made
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "moeopt.json").write_text(json.dumps({"format": "moeopt-checkpoint"}))
    tmp = atomic_dir(ours, overwrite=True)
    (tmp / "new").write_text("x")
    commit_dir(tmp, ours, overwrite=True)
    assert [p.name for p in ours.iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "ours", "user"]  # the old one removed
    tmp = atomic_dir(tmp_path / "empty")
    (tmp / "new").write_text("x")
    commit_dir(tmp, tmp_path / "empty")
    assert [p.name for p in (tmp_path / "empty").iterdir()] == ["new"]


def test_convert_never_replaces_a_users_folder(
    tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    user = _user_folder(tmp_path / "user")
    code, _, err = run_cli("convert", str(tiny_ckpt), "-o", str(user), capsys=capsys)
    one_line_exit_2(code, err, "not empty; give --overwrite")
    code, _, err = run_cli("convert", str(tiny_ckpt), "-o", str(user), "--overwrite", capsys=capsys)
    one_line_exit_2(code, err, "not a folder moeopt wrote")
    assert [p.name for p in user.iterdir()] == ["thesis.tex"] and (user / "thesis.tex").read_text() == "years of work"
    dest = tmp_path / "ck"
    code, out, _ = run_cli("convert", str(tiny_ckpt), "-o", str(dest), capsys=capsys)
    assert code == 0 and "wrote" in out
    code, _, err = run_cli("convert", str(tiny_ckpt), "-o", str(dest), "--passes", "canonicalize", capsys=capsys)
    one_line_exit_2(code, err, "not empty; give --overwrite")
    assert moeopt.load(dest).history == ["verify"]  # untouched
    code, _, _ = run_cli("convert", str(tiny_ckpt), "-o", str(dest), "--passes", "canonicalize", "--overwrite",
                         capsys=capsys)
    assert code == 0 and moeopt.load(dest).history == ["canonicalize"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "user"]  # no temporary or old folder left


def test_lower_never_replaces_a_users_folder(
    tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused before the model is loaded (the lowering itself, and --overwrite of an artifact, are in
    test_lower_verify.py)."""
    user = _user_folder(tmp_path / "user")
    code, _, err = run_cli("lower", str(tiny_ckpt), "-o", str(user), capsys=capsys)
    one_line_exit_2(code, err, "not empty; give --overwrite")
    code, _, err = run_cli("lower", str(tiny_ckpt), "-o", str(user), "--overwrite", capsys=capsys)
    one_line_exit_2(code, err, "not a folder moeopt wrote")
    code, _, err = run_cli("convert", str(tiny_ckpt), "-o", str(tmp_path / "ck"),
                           "--passes", f"lower{{out={user}}}", capsys=capsys)
    one_line_exit_2(code, err, "not empty; give --overwrite")
    assert [p.name for p in user.iterdir()] == ["thesis.tex"] and (user / "thesis.tex").read_text() == "years of work"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_model_save_needs_overwrite(tmp_path: Path) -> None:
    from moeopt.testing import tiny_model

    model = moeopt.load(tiny_model("mixtral"))
    model.save(tmp_path / "ck")
    with pytest.raises(BadInputError, match="not empty"):
        model.save(tmp_path / "ck")
    model.save(tmp_path / "ck", overwrite=True)
    with pytest.raises(BadInputError, match="not a folder moeopt wrote"):
        model.save(_user_folder(tmp_path / "user"), overwrite=True)
