#!/usr/bin/env python3
"""The device install, checked: a fresh venv with only moeopt's runtime dependencies runs the committed
tiny artifacts with the `moeopt` command, and torch is absent there.

    python scripts/runtime_install.py [--python PYTHON ...] [--keep DIR]     # make test-runtime: 3.10-3.12

For each interpreter: `python -m venv`, `pip install` of a wheel of this checkout without extras (the
dependencies' wheels are downloaded from the package index once per interpreter and requirement list, into
~/.cache/moeopt/runtime-wheels, so reruns need no network), then in that venv, outside the checkout:
  - `import torch` fails (and transformers);
  - `moeopt run tests/fixtures/tiny-artifact --ids PROMPT` prints the greedy tokens of the artifact's
    parity.npz (PyTorch's, recorded when it was lowered), and so does the offload artifact with a cache
    budget of two experts (experts read from experts.bin while decoding);
  - `moeopt eval` of the artifact on tests/fixtures/data (perplexity on news, accuracy on intent) succeeds
    and writes its JSON (--json-dir keeps it to compare);
  - a compiler command (`moeopt inspect`) fails in one line naming the `compile` extra, exit status 2.
Runs under the project's environment (its pip installs into the venvs; numpy reads parity.npz). Exit
status 0: all passed; 1: a check failed; 3: the package index cannot be reached and nothing is cached.
Regenerate the artifacts with scripts/tiny_artifact.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
ARTIFACT = FIXTURES / "tiny-artifact"
OFFLOAD = FIXTURES / "tiny-artifact-offload"
DATA = FIXTURES / "data"
UNREACHABLE = 3
MAX_NEW = 8


class CheckFailed(Exception):
    """A check of the runtime-only install failed (the message says which and shows the output)."""


class Unreachable(Exception):
    """The package index cannot be reached and the wheels are not cached: nothing can be checked."""


def index_url() -> str:
    """The index pip uses here (PIP_INDEX_URL, pip config, else PyPI)."""
    url = os.environ.get("PIP_INDEX_URL", "")
    if not url:
        res = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                             capture_output=True, text=True)
        url = res.stdout.strip() if res.returncode == 0 else ""
    return url or "https://pypi.org/simple"


def reachable(url: str, timeout: float = 15.0) -> str | None:
    """None if the index answers, else why not (one line)."""
    if url.startswith("file:"):
        return None
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/onnxruntime/", timeout=timeout) as r:
            r.read(256)
        return None
    except Exception as e:  # any failure to reach it: DNS, refused, proxy, TLS
        return f"{url} unreachable ({type(e).__name__}: {e})"


def build_wheel(out: Path) -> Path:
    """A wheel of this checkout (pure Python: one serves every interpreter), built from a clean copy so
    that nothing is written into the checkout."""
    src = out / "src"
    shutil.copytree(REPO / "moeopt", src / "moeopt", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    isolation = ["--no-build-isolation"] if have_build_backend() else []
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(out), str(src)],
        "building the moeopt wheel")
    wheel = next(out.glob("moeopt-*.whl"))
    heavy = [r for r in requirements(wheel) if any(f" {m}" in r.lower() for m in ("torch", "transformers", "scipy"))]
    if heavy:
        raise CheckFailed(f"the base install requires the compiler: {heavy}")
    return wheel


def have_build_backend() -> bool:
    """Whether this interpreter can build the wheel itself (setuptools and wheel installed: no isolated
    build environment to fetch)."""
    res = subprocess.run([sys.executable, "-c", "import setuptools, wheel"], capture_output=True)
    return res.returncode == 0


def requirements(wheel: Path) -> list[str]:
    """The wheel's base (no extra) Requires-Dist lines."""
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    return [line for line in meta.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]


def wheelhouse(vpy: str, wheel: Path, version: str, env: dict[str, str]) -> Path:
    """The runtime dependencies' wheels for this interpreter, downloaded once (pip resolves them from the
    package index) and kept under ~/.cache/moeopt: reruns install from it without the network. Keyed by
    the Python version and the requirements, so a changed dependency list downloads afresh."""
    key = hashlib.sha256("\n".join([version, sys.platform, *requirements(wheel)]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moeopt" / "runtime-wheels"
    house = cache / f"py{version}-{key}"
    if not (house / ".ok").is_file():
        why = reachable(index_url())
        if why is not None:
            raise Unreachable(why)
        tmp = house.with_name(house.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        run([sys.executable, "-m", "pip", "--python", vpy, "download", "-q", "-d", str(tmp), str(wheel)],
            "pip download of the runtime dependencies", env=env)
        (tmp / wheel.name).unlink(missing_ok=True)
        (tmp / ".ok").touch()
        shutil.rmtree(house, ignore_errors=True)
        tmp.rename(house)
    return house


def run(cmd: list[str], what: str, *, env: dict[str, str] | None = None, cwd: Path | None = None,
        expect: int = 0) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    if res.returncode != expect:
        tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-15:])
        raise CheckFailed(f"{what}: exit {res.returncode} (expected {expect}): {' '.join(cmd)}\n{tail}")
    return res


def parity(folder: Path) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy tokens) that PyTorch recorded in the artifact's parity.npz."""
    import numpy as np  # the host's numpy: the caller runs in the project's environment

    with np.load(folder / "parity.npz") as z:
        return [int(t) for t in z["prompt"][0]], [int(t) for t in z["tokens"][0][:MAX_NEW]]


def check(python: str, wheel: Path, venv: Path, json_dir: Path | None) -> str:
    """Run every check on one interpreter; returns a one-line summary, raises CheckFailed."""
    t0 = time.monotonic()
    # No pip in the venv (ensurepip alone takes ~10 s here): this interpreter's pip installs into it.
    run([python, "-m", "venv", "--without-pip", str(venv)], f"{python} -m venv")
    vpy = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PYTHONNOUSERSITE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    version = run([vpy, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"], "python", env=env).stdout.strip()
    house = wheelhouse(vpy, wheel, version, env)
    run([sys.executable, "-m", "pip", "--python", vpy, "install", "-q", "--no-compile", "--no-index",
         "--find-links", str(house), str(wheel)], "pip install moeopt (runtime only)", env=env)
    t_install = time.monotonic() - t0
    cwd = venv  # not the checkout: the installed moeopt must be the one that runs
    for mod in ("torch", "transformers"):
        res = subprocess.run([vpy, "-c", f"import {mod}"], capture_output=True, text=True, env=env, cwd=cwd)
        if res.returncode == 0:
            raise CheckFailed(f"`import {mod}` works in the runtime-only venv: the base install pulled it in")
    where = run([vpy, "-c", "import moeopt; print(moeopt.__file__)"], "import moeopt", env=env, cwd=cwd).stdout
    if str(REPO) in where:
        raise CheckFailed(f"moeopt was imported from the checkout ({where.strip()}), not from the venv")
    moeopt = str(venv / "bin" / "moeopt")
    run([moeopt, "--help"], "moeopt --help", env=env, cwd=cwd)
    for folder, extra in ((ARTIFACT, []), (OFFLOAD, ["--budget", "30KB", "--policy", "lru"])):
        prompt, want = parity(folder)
        out = run([moeopt, "run", str(folder), "--ids", ",".join(map(str, prompt)),
                   "--max-new-tokens", str(MAX_NEW), *extra], f"moeopt run {folder.name}", env=env, cwd=cwd).stdout
        got = [int(t) for t in out.splitlines()[0].split()]
        if got != want:
            raise CheckFailed(f"moeopt run {folder.name}: tokens {got}, parity.npz has {want}")
        if extra and "misses" not in out:
            raise CheckFailed(f"moeopt run {folder.name} {' '.join(extra)}: no expert cache report\n{out}")
    out_json = (json_dir or venv) / f"eval-{version}.json"
    run([moeopt, "eval", str(ARTIFACT), "--data", str(DATA), "--ppl", "news", "--tasks", "intent",
         "--ppl-tokens", "200", "--app-examples", "8", "--json", str(out_json)], "moeopt eval", env=env, cwd=cwd)
    res = json.loads(out_json.read_text())
    ppl, acc = res["perplexity"]["news"]["ppl"], res["apps"]["intent"]["accuracy"]
    err = run([moeopt, "inspect", str(ARTIFACT)], "moeopt inspect without the compiler", env=env, cwd=cwd,
              expect=2).stderr.strip()
    if len(err.splitlines()) != 1 or "moeopt[compile]" not in err:
        raise CheckFailed(f"moeopt inspect without the compiler: expected one line naming moeopt[compile]:\n{err}")
    return (f"python {version}: runtime-only install ok (installed in {t_install:.0f} s, checks "
            f"{time.monotonic() - t0 - t_install:.0f} s; no torch; run == parity tokens, resident and offload; "
            f"eval ppl/news {ppl:.2f}, acc/intent {acc:.3f})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", action="append", default=[], help="interpreter(s) to check (default: this one)")
    ap.add_argument("--keep", type=Path, default=None, help="make the venvs under this folder and keep them")
    ap.add_argument("--json-dir", type=Path, default=None, help="where eval writes eval-VERSION.json")
    ap.add_argument("--build-wheel", type=Path, default=None, metavar="DIR",
                    help="only build the moeopt wheel into DIR and print its path (scripts/arm64/test.sh)")
    args = ap.parse_args()
    if args.build_wheel is not None:
        args.build_wheel.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="moeopt-wheel-") as tmp:
            try:
                wheel = build_wheel(Path(tmp))
            except CheckFailed as e:
                print(f"runtime-install: FAIL: {e}", file=sys.stderr)
                return 1
            for old in args.build_wheel.glob("moeopt-*.whl"):
                old.unlink()
            print(shutil.copy2(wheel, args.build_wheel / wheel.name))
        return 0
    pythons = args.python or [sys.executable]
    missing = [p for p in pythons if shutil.which(p) is None]
    if missing:
        print(f"runtime-install: FAIL: no interpreter {', '.join(missing)} (make test-runtime wants pyenv's "
              "3.10, 3.11 and 3.12: pyenv install 3.10 3.12)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="moeopt-runtime-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        fails = 0
        t0 = time.monotonic()
        try:
            wheel = build_wheel(Path(tmp) / "wheel")
        except CheckFailed as e:
            print(f"runtime-install: FAIL: {e}", file=sys.stderr)
            return 1
        print(f"runtime-install: built {wheel.name} in {time.monotonic() - t0:.0f} s", flush=True)
        for i, python in enumerate(pythons):
            venv = root / f"venv-{i}-{Path(python).parent.parent.name}"
            shutil.rmtree(venv, ignore_errors=True)
            try:
                print(f"runtime-install: {check(python, wheel, venv, args.json_dir)}", flush=True)
            except CheckFailed as e:
                fails += 1
                print(f"runtime-install: FAIL ({python}): {e}", file=sys.stderr, flush=True)
            except Unreachable as e:
                print(f"runtime-install: skipped ({python}): {e}", file=sys.stderr, flush=True)
                return UNREACHABLE
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
