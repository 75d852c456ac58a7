"""The `moeopt` command end to end on a saved tiny checkpoint, and its one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moeopt
from moeopt.cli import main


def run_cli(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    argv = sys.argv
    sys.argv = ["moeopt", *args]
    code = 0
    try:
        main()
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        sys.argv = argv
    out = capsys.readouterr()
    return code, out.out, out.err


def test_inspect_passes_convert(tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli("inspect", str(tiny_ckpt), capsys=capsys)
    assert code == 0 and "MoE layers: 2" in out and "adapter: MixtralSparseMoeBlock -> mixtral" in out
    code, out, _ = run_cli("inspect", str(tiny_ckpt), "--json", capsys=capsys)
    info = json.loads(out)
    assert info["architecture"] == "mixtral" and info["params"]["expert"] > info["params"]["non_expert"]
    code, out, _ = run_cli("passes", capsys=capsys)
    assert code == 0 and all(name in out for name in ("canonicalize", "verify", "print"))
    dest = tmp_path / "out"
    code, out, _ = run_cli(
        "convert",
        str(tiny_ckpt),
        "-o",
        str(dest),
        "--passes",
        "canonicalize,verify",
        "--verify-each",
        "--timing",
        "--stats",
        capsys=capsys,
    )
    assert code == 0 and "wrote" in out and "total" in out
    again = moeopt.load(dest)
    assert again.history == ["canonicalize,verify"]
    ids = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.logits(ids), moeopt.load(tiny_ckpt).logits(ids))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def one_line_exit_2(code: int, err: str, *fragments: str) -> None:
    """Exit code 2 and exactly one stderr line, moeopt's error line, naming every fragment (the CLI's
    bad-input contract; the other CLI tests call this too)."""
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moeopt: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], err


def test_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli("inspect", str(tmp_path / "nope"), capsys=capsys)
    one_line_exit_2(code, err, "no such checkpoint folder")


def test_dense_model_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "dense")
    code, _, err = run_cli("inspect", str(tmp_path / "dense"), capsys=capsys)
    one_line_exit_2(code, err, "LlamaForCausalLM has no MoE blocks")


def test_truncated_safetensors(tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    bad = tmp_path / "trunc"
    shutil.copytree(tiny_ckpt, bad)
    f = bad / "model.safetensors"
    os.truncate(f, f.stat().st_size - 1000)
    code, _, err = run_cli("convert", str(bad), "-o", str(tmp_path / "o"), capsys=capsys)
    one_line_exit_2(code, err, "truncated safetensors file")
    assert not (tmp_path / "o").exists()


def test_corrupt_config_and_unknown_model_type(
    tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    bad = tmp_path / "cfg"
    shutil.copytree(tiny_ckpt, bad)
    (bad / "config.json").write_text("{not json")
    code, _, err = run_cli("inspect", str(bad), capsys=capsys)
    one_line_exit_2(code, err, "corrupt config.json")
    (bad / "config.json").write_text(json.dumps({"model_type": "no-such-moe"}))
    code, _, err = run_cli("inspect", str(bad), capsys=capsys)
    one_line_exit_2(code, err, "model_type 'no-such-moe' is not known")


def test_bad_pipeline_fails_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(
        "convert", str(tmp_path / "nope"), "-o", str(tmp_path / "o"), "--passes", "prune{", capsys=capsys
    )
    one_line_exit_2(code, err, "unbalanced '{'")


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, _ = run_cli("no-such-command", capsys=capsys)
    assert code == 2
    code, _, _ = run_cli("inspect", capsys=capsys)
    assert code == 2


def test_debug_shows_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(moeopt.BadInputError):
        run_cli("--debug", "inspect", str(tmp_path / "nope"), capsys=capsys)


def test_entry_point_subprocess(tiny_ckpt: Path) -> None:
    """The installed console script, as a user runs it."""
    exe = Path(sys.executable).with_name("moeopt")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moeopt.cli"]
    ok = subprocess.run([*cmd, "inspect", str(tiny_ckpt)], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and "MoE layers: 2" in ok.stdout
    bad = subprocess.run([*cmd, "inspect", str(tiny_ckpt / "missing")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("moeopt: error: no such checkpoint folder")
