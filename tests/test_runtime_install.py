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


def test_numpy_scoring_matches_torch_scoring() -> None:
    """Artifacts are scored in numpy (no torch on a device): on the same model's logits, perplexity and app
    scores equal what the torch path computes."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from moeopt.data import APPS, app_split, lm_split
    from moeopt.eval import app_accuracy, label_scores, perplexity
    from moeopt.eval.model_io import is_numpy_lm
    from tests.conftest import fixture_tokenizer

    tok = fixture_tokenizer()
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=128)
    model = MixtralForCausalLM(cfg).eval()

    class AsNumpy:
        config = model.config

        def numpy_logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                out = model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask))
            return out.logits.numpy()

    wrapped = AsNumpy()
    assert is_numpy_lm(wrapped) and not is_numpy_lm(model)
    texts = [r["text"] for r in lm_split(FIXTURE_DATA, "news", "test")]
    ref = perplexity(model, tok, texts, context=48, max_tokens=300, progress=False)  # windows of unequal length
    got = perplexity(wrapped, tok, texts, context=48, max_tokens=300, progress=False)
    assert got["tokens"] == ref["tokens"] == 300 and got["windows"] > 1
    assert got["nll"] == pytest.approx(ref["nll"], rel=1e-6)
    app = APPS["intent"]
    rows = app_split(FIXTURE_DATA, app.name, "test")[:12]
    texts = [r["text"] for r in rows]
    np.testing.assert_allclose(label_scores(wrapped, tok, app, texts, progress=False),
                               label_scores(model, tok, app, texts, progress=False), rtol=1e-5, atol=1e-5)
    a, b = app_accuracy(model, tok, app, rows, progress=False), app_accuracy(wrapped, tok, app, rows, progress=False)
    assert b["accuracy"] == a["accuracy"] and b["gold_nll"] == pytest.approx(a["gold_nll"], rel=1e-6)


def test_an_older_onnxruntime_is_named_when_a_graph_does_not_load() -> None:
    """Python 3.10 gets onnxruntime 1.23.2 at most, which rejects the QMoE nodes of quantized artifacts."""
    import onnxruntime as ort

    from moeopt.runtime.session import _version, older_ort_hint

    assert _version("1.32.0") == (1, 32, 0) and _version("2.13.0+cpu") == (2, 13, 0)
    assert _version("1.33.0.dev20260101") == (1, 33, 0) and _version("1.23.2") < _version("1.32.0")
    hint = older_ort_hint({"versions": {"onnxruntime": "99.1.0"}})
    assert f"checked with onnxruntime 99.1.0, this is the older {ort.__version__}" in hint and "\n" not in hint
    assert older_ort_hint({"versions": {"onnxruntime": ort.__version__}}) == ""
    assert older_ort_hint({"versions": {"onnxruntime": "1.0.0"}}) == older_ort_hint({}) == ""
