"""The device install: artifacts run with the `moeopt` command where torch is not installed.

The committed tiny artifacts (tests/fixtures/tiny-artifact{,-offload}, made by scripts/tiny_artifact.py)
run in a fresh venv holding only the base (runtime) dependencies (scripts/runtime_install.py, which
`make test-runtime` runs for Python 3.10, 3.11 and 3.12), and in this environment with torch made
unimportable.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import FIXTURE_DATA

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "runtime_install.py"
ART = REPO / "tests" / "fixtures" / "tiny-artifact"
OFFLOAD = REPO / "tests" / "fixtures" / "tiny-artifact-offload"
EVAL_ARGS = ("--data", str(FIXTURE_DATA), "--ppl", "news", "--tasks", "intent", "--ppl-tokens", "200",
             "--app-examples", "8")

# Runs the moeopt command with torch and transformers unimportable (None in sys.modules makes `import`
# raise ImportError), as on a device where they are not installed.
NO_TORCH = """
import sys
for name in ("torch", "transformers", "scipy", "onnxscript", "onnx_ir", "peft", "accelerate"):
    sys.modules[name] = None
from moeopt.cli import main
sys.argv = ["moeopt", *sys.argv[1:]]
try:
    main()
finally:
    leaked = [m for m in sys.modules if m.split(".")[0] == "torch" and sys.modules[m] is not None]
    assert not leaked, leaked
"""


def no_torch(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", NO_TORCH, *argv], capture_output=True, text=True, cwd=REPO,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "TOKENIZERS_PARALLELISM": "false"})


def parity_tokens(folder: Path) -> tuple[str, list[int]]:
    with np.load(folder / "parity.npz") as z:
        return ",".join(str(int(t)) for t in z["prompt"][0]), [int(t) for t in z["tokens"][0]]


def test_run_and_eval_an_artifact_without_torch(tmp_path: Path) -> None:
    for folder, extra in ((ART, ()), (OFFLOAD, ("--budget", "30KB", "--policy", "lru"))):
        prompt, want = parity_tokens(folder)
        res = no_torch("run", str(folder), "--ids", prompt, "--max-new-tokens", str(len(want)), *extra)
        assert res.returncode == 0, res.stderr
        assert [int(t) for t in res.stdout.splitlines()[0].split()] == want, (folder.name, res.stdout)
    res = no_torch("eval", str(ART), *EVAL_ARGS, "--json", str(tmp_path / "eval.json"))
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "eval.json").read_text())["apps"]["intent"]["n"] == 8
    # `run` accepts a manifest with fields it does not know (e.g. verification results added later)
    copy = tmp_path / "art"
    copy.mkdir()
    for p in ART.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest.update(parity_measured=1e-7, verified=True)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    prompt, want = parity_tokens(copy)
    res = no_torch("run", str(copy), "--ids", prompt, "--max-new-tokens", str(len(want)))
    assert res.returncode == 0 and [int(t) for t in res.stdout.splitlines()[0].split()] == want, res.stderr


def test_compiler_commands_without_torch_fail_in_one_line() -> None:
    res = no_torch("--help")
    assert res.returncode == 0 and "lower" in res.stdout, res.stderr
    for argv in (("inspect", str(ART)), ("eval", str(REPO / "moeopt" / "assets" / "reference-moe"), *EVAL_ARGS),
                 ("lower", str(ART), "-o", "/nonexistent/never-written")):
        res = no_torch(*argv)
        assert res.returncode == 2, (argv, res.stderr)
        assert res.stderr.strip() == ("moeopt: error: this command needs the compiler: "
                                      "pip install 'moeopt[compile]' (no module 'torch' here)"), argv


def test_a_fresh_runtime_only_venv_runs_the_tiny_artifacts(tmp_path: Path) -> None:
    """pip installs moeopt without extras into a new venv; there `import torch` fails and `moeopt run` /
    `moeopt eval` run the committed artifacts (tokens equal to parity.npz), as in-process eval scores them."""
    res = subprocess.run([sys.executable, str(SCRIPT), "--json-dir", str(tmp_path)], capture_output=True, text=True)
    if res.returncode == 3:
        pytest.skip(f"no package index to install from: {res.stderr.strip()}")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "runtime-only install ok" in res.stdout
    (got_file,) = tmp_path.glob("eval-*.json")
    got = json.loads(got_file.read_text())
    ref = no_torch("eval", str(ART), *EVAL_ARGS, "--json", str(tmp_path / "here.json"))
    assert ref.returncode == 0, ref.stderr
    here = json.loads((tmp_path / "here.json").read_text())
    assert got["perplexity"]["news"]["ppl"] == pytest.approx(here["perplexity"]["news"]["ppl"], rel=1e-5)
    assert got["apps"]["intent"]["gold_nll"] == pytest.approx(here["apps"]["intent"]["gold_nll"], rel=1e-5)
