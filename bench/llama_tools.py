"""llama.cpp's command-line tools for the benches, built from the llama-cpp-python sdist and cached.

The quantization bench (bench/quantize_real.py) compares moeopt's quantizers with llama.cpp's on the
same GGUF, which needs llama.cpp's own binaries (llama-quantize, llama-imatrix, llama-perplexity,
llama-tokenize, llama-bench) rather than the Python bindings: the bindings expose no perplexity or
importance-matrix driver, and llama-perplexity's scoring rule is the reference the bench must match.
The one pinned source the project already uses is the llama-cpp-python sdist (bench/runtime.py reads
its vendored convert_hf_to_gguf.py), so the tools are built from that same source:

* the sdist is fetched with pip (`pip download --no-deps --no-binary :all:`) and unpacked under
  <cache>/llama-src (the layout bench/runtime.py documents);
* llama.cpp's vendored tree is configured with cmake (CPU only, Release, static, no tests, server or
  network) and only the five tool targets are built (a full build is several times longer);
* the binaries are copied to <cache>/llama-bin/<version>/ beside a build.json that records the build's
  wall time, so later runs (and other benches) find them with `find_tool`.

<cache> is $MOEOPT_BENCH_CACHE or ~/.cache/moeopt/bench; $MOEOPT_LLAMA_BIN names a folder of
prebuilt tools that is searched first. Building takes 15+ minutes on a free 4-core machine and over
an hour on a loaded 2-core one, so run it once, in the background:

    nice -n 10 nohup python -m bench.llama_tools build --jobs 2 > /tmp/llama-build.log 2>&1 &
    python -m bench.llama_tools status
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python release whose vendored llama.cpp is built
TOOLS = ("llama-quantize", "llama-perplexity", "llama-imatrix", "llama-tokenize", "llama-bench")
CACHE = Path(os.environ.get("MOEOPT_BENCH_CACHE", Path.home() / ".cache" / "moeopt" / "bench"))
SRC_ROOT = CACHE / "llama-src"
BIN_ROOT = CACHE / "llama-bin"
BUILD_ROOT = CACHE / "llama-build"

# CPU only, static binaries (no rpath to a build folder that may be deleted), nothing networked and
# nothing the five tools do not need configured or built.
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=ON",
    "-DGGML_CUDA=OFF", "-DGGML_METAL=OFF", "-DGGML_VULKAN=OFF", "-DGGML_OPENCL=OFF", "-DGGML_RPC=OFF",
    "-DGGML_BACKEND_DL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_COMMON=ON",
    "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_LLGUIDANCE=OFF",
)


def bin_dir(version: str = VERSION) -> Path:
    """Folder the built tools are cached in."""
    return BIN_ROOT / version


def source_dir(version: str = VERSION) -> Path:
    """llama.cpp's tree inside the unpacked sdist (may not exist yet)."""
    return SRC_ROOT / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"


def _candidates(name: str) -> list[Path]:
    dirs = [Path(os.environ["MOEOPT_LLAMA_BIN"])] if os.environ.get("MOEOPT_LLAMA_BIN") else []
    return [d / name for d in [*dirs, bin_dir()]]


def find_tool(name: str) -> Path | None:
    """The executable `name` (e.g. "llama-perplexity") if built or provided, else None (see `why_absent`)."""
    for path in _candidates(name):
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None


def why_absent(name: str) -> str | None:
    """None when `find_tool(name)` finds the tool, else one line saying why it does not."""
    if find_tool(name) is not None:
        return None
    if name not in TOOLS:
        return f"{name} is not one of the tools bench/llama_tools.py builds ({', '.join(TOOLS)})"
    looked = ", ".join(str(p) for p in _candidates(name))
    log = BUILD_ROOT / VERSION / "build.log"
    hint = f"; the last build's log is {log}" if log.exists() else ""
    return (f"{name} not found (looked at {looked}); build it with "
            f"`nice -n 10 python -m bench.llama_tools build --jobs 2` (15+ min; over an hour on 2 loaded cores){hint}")


def build_info(version: str = VERSION) -> dict[str, object] | None:
    """What build.json recorded about the cached build (its wall time, flags), or None."""
    path = bin_dir(version) / "build.json"
    return json.loads(path.read_text()) if path.exists() else None


def _run(cmd: list[str], log: Path, cwd: Path | None = None) -> None:
    with log.open("a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
    if rc != 0:
        raise RuntimeError(f"`{' '.join(cmd[:3])} ...` exited {rc}; see {log}")


def fetch_source(version: str = VERSION, log: Path | None = None) -> Path:
    """Download and unpack the llama-cpp-python sdist once; returns llama.cpp's vendored tree."""
    src = source_dir(version)
    if (src / "CMakeLists.txt").exists():
        return src
    SRC_ROOT.mkdir(parents=True, exist_ok=True)
    tarball = SRC_ROOT / f"llama_cpp_python-{version}.tar.gz"
    if not tarball.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={version}", "-d", str(SRC_ROOT)]
        _run(cmd, log or Path(os.devnull))
    with tarfile.open(tarball) as tar:
        tar.extractall(SRC_ROOT, filter="data")
    if not (src / "CMakeLists.txt").exists():
        raise RuntimeError(f"the sdist {tarball} has no vendor/llama.cpp/CMakeLists.txt")
    return src


def _build_tools() -> tuple[str, str, list[str]]:
    """cmake and a generator: the system's when present, else pip's cmake/ninja in a /tmp venv."""
    cmake, ninja = shutil.which("cmake"), shutil.which("ninja")
    extra: list[str] = []
    if cmake is None or ninja is None:
        venv = Path("/tmp/moeopt-llama-build-venv")
        py = venv / "bin" / "python"
        if not py.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "cmake", "ninja"], check=True)
        cmake = cmake or str(venv / "bin" / "cmake")
        ninja = ninja or str(venv / "bin" / "ninja")
    extra = [f"-DCMAKE_MAKE_PROGRAM={ninja}"]
    return cmake, ninja, extra


def build(jobs: int = 2, version: str = VERSION, tools: tuple[str, ...] = TOOLS) -> Path:
    """Fetch, configure and build `tools`, copy them to `bin_dir(version)`; returns that folder."""
    out = bin_dir(version)
    build_dir = BUILD_ROOT / version
    build_dir.mkdir(parents=True, exist_ok=True)
    log = build_dir / "build.log"
    log.write_text("")
    t0 = time.monotonic()
    src = fetch_source(version, log)
    t_fetch = time.monotonic() - t0
    cmake, _ninja, extra = _build_tools()
    _run([cmake, "-S", str(src), "-B", str(build_dir), "-G", "Ninja", *extra, *CMAKE_FLAGS], log)
    t_conf = time.monotonic() - t0 - t_fetch
    _run([cmake, "--build", str(build_dir), "--target", *tools, "-j", str(jobs)], log)
    t_total = time.monotonic() - t0
    out.mkdir(parents=True, exist_ok=True)
    for name in tools:
        hits = [p for p in build_dir.rglob(name) if p.is_file() and os.access(p, os.X_OK)]
        if not hits:
            raise RuntimeError(f"the build produced no {name}; see {log}")
        shutil.copy2(hits[0], out / name)
    info = {
        "llama_cpp_python": version, "tools": list(tools), "jobs": jobs, "cmake_flags": list(CMAKE_FLAGS),
        "fetch_s": round(t_fetch, 1), "configure_s": round(t_conf, 1), "build_wall_s": round(t_total, 1),
        "cpu_count": os.cpu_count(), "load_avg_at_end": os.getloadavg(),
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / "build.json").write_text(json.dumps(info, indent=1) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    """`build` the tools or print their `status` (one line each)."""
    ap = argparse.ArgumentParser(prog="python -m bench.llama_tools", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="fetch the sdist, build the tools, cache them")
    b.add_argument("--jobs", type=int, default=2)
    b.add_argument("--force", action="store_true", help="rebuild even if every tool is cached")
    sub.add_parser("status", help="where each tool is, or why it is absent")
    args = ap.parse_args(argv)
    if args.cmd == "build":
        if not args.force and all(find_tool(t) for t in TOOLS):
            print(f"all tools cached in {bin_dir()}")
            return 0
        print(f"built into {build(jobs=args.jobs)}: {build_info()}")
        return 0
    for t in TOOLS:
        print(f"{t}: {find_tool(t) or why_absent(t)}")
    info = build_info()
    if info:
        print(f"build: {info.get('build_wall_s')} s wall, jobs={info.get('jobs')}, finished {info.get('finished_utc')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
