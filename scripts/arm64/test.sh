#!/usr/bin/env bash
# make test-arm64: the device install on ARM64, emulated on an x86-64 host. It checks that onnxruntime's
# aarch64 kernels give the same tokens and logits as PyTorch on artifacts of the reference model (the
# plain-onnxruntime parity check, scripts/run_artifact.py --parity), and that the runtime-only install
# (no torch) runs `moeopt run` / `moeopt eval`; its timings mean nothing (qemu emulation).
#
#   1. host (.venv): lower moeopt/assets/reference-moe for --target arm64: float, 4-bit (QMoE,
#      accuracy level 0) and 4-bit with int8 activations (accuracy level 4: the ARM int8 dot-product
#      kernels) into build/arm64/artifacts/ (rebuilt when moeopt/ or the model is newer).
#   2. an arm64 Debian 12 (bookworm, Python 3.11) root, made once by debootstrap's first stage
#      (root.sh; cached in build/arm64/root).
#   3. the runtime-only install, as a device gets it: a wheel of this checkout (scripts/runtime_install.py
#      --build-wheel) and its base dependencies' aarch64 wheels from PyPI (onnxruntime and numpy at
#      .venv's versions), installed on the host with pip's --platform (no arm64 code runs): the
#      dependencies into build/arm64/site-deps-* (cached by requirement list), moeopt into
#      build/arm64/site-moeopt (every run). No torch: the base install has none.
#   4. scripts/arm64/parity.py (prints platform.machine(), then runs run_artifact.py --parity) under
#      qemu-aarch64-static -L ROOT for each artifact and each emulated CPU in ARM64_CPUS.
#   5. on the first CPU of ARM64_CPUS, the installed moeopt command (python3 -m moeopt.cli) on the
#      committed tiny artifacts (tests/fixtures/tiny-artifact{,-offload}): `import torch` fails, `moeopt
#      run` prints parity.npz's greedy tokens (the offload one with a two-expert cache), `moeopt eval`
#      runs on tests/fixtures/data.
#
# Settings (environment): ARM64_BUILD (build/arm64), ARM64_ROOT (ARM64_BUILD/root), ARM64_CPUS
# ("cortex-a72 max": plain NEON, and every feature qemu emulates: dotprod, i8mm, bf16, SVE2),
# ARM64_ARTIFACTS ("float q4 q4-int8"), ARM64_KEEP_ARTIFACTS=1 (reuse built artifacts even when
# moeopt/ is newer, skipping ~4 minutes of lowering), DEBIAN_MIRROR. Needs root (or sudo) for
# apt-get and debootstrap the first time. Exit status 0 when every check passes, 1 otherwise;
# errors are one line.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD

BUILD=${ARM64_BUILD:-build/arm64}
mkdir -p "$BUILD/logs"
BUILD=$(realpath "$BUILD")
ROOT=${ARM64_ROOT:-$BUILD/root}
CPUS=${ARM64_CPUS:-cortex-a72 max}
ARTIFACTS=${ARM64_ARTIFACTS:-float q4 q4-int8}
VENV_PY=$REPO/.venv/bin/python
MODEL=moeopt/assets/reference-moe
LOGS=$BUILD/logs

log() { echo "test-arm64: $*"; }
die() { echo "test-arm64: error: $*" >&2; exit 1; }
t_start=$SECONDS

[ -x "$VENV_PY" ] || die "no .venv: run 'make setup' first"
[ -d "$MODEL" ] || die "$MODEL is missing"

# Each artifact: its pipeline (ending in lower{out=@OUT@,target=arm64,...}), and the parity tolerance
# on max |logit diff| (run_artifact.py --tol). Float and 4-bit at accuracy level 0 are exact up to
# float32 rounding (PyTorch's reference for a quantized model is its dequantized weights), so they keep
# run_artifact.py's default 1e-3. Accuracy level 4 quantizes activations to int8 on purpose (README:
# ~1% logit error): tokens must still be identical, logits within 0.25 (measured: 0.063 on x86-64 and
# on qemu's max CPU, whose dot-product kernels run; 1.1e-05 on cortex-a72, which has no int8 dot
# product, so ORT apparently keeps float activations there).
declare -A PIPELINE=(
  [float]='lower{out="@OUT@",target=arm64,overwrite=true}'
  [q4]='quantize{method=uniform,bits=4},lower{out="@OUT@",target=arm64,overwrite=true}'
  [q4-int8]='quantize{method=uniform,bits=4},lower{out="@OUT@",target=arm64,accuracy-level=4,overwrite=true}'
)
declare -A TOL=([float]=1e-3 [q4]=1e-3 [q4-int8]=0.25)

# --- 0. host tools -------------------------------------------------------------------------------
if ! command -v debootstrap >/dev/null || ! command -v qemu-aarch64-static >/dev/null; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  command -v apt-get >/dev/null || die "needs the Debian packages debootstrap and qemu-user-static (no apt-get here)"
  log "installing debootstrap and qemu-user-static with apt-get (log: $LOGS/apt.log)"
  { $SUDO apt-get update -q && $SUDO apt-get install -y -q debootstrap qemu-user-static; } >"$LOGS/apt.log" 2>&1 \
    || die "apt-get install debootstrap qemu-user-static failed (see $LOGS/apt.log)"
fi

# --- 1. artifacts (x86 host, .venv) --------------------------------------------------------------
t0=$SECONDS
for name in $ARTIFACTS; do
  [ -n "${TOL[$name]+x}" ] || die "unknown artifact '$name' in ARM64_ARTIFACTS (float, q4, q4-int8)"
  out=$BUILD/artifacts/$name
  stamp=$out/manifest.json
  if [ -f "$stamp" ] && [ "${ARM64_KEEP_ARTIFACTS:-0}" = 1 ]; then
    continue
  fi
  if [ -f "$stamp" ] && [ -z "$(find moeopt "$MODEL" -newer "$stamp" -type f \( -name '*.py' -o -path "$MODEL/*" \) -print -quit)" ]; then
    continue
  fi
  pipeline=${PIPELINE[$name]//@OUT@/$out}
  log "lowering $name: $pipeline (log: $LOGS/lower-$name.log)"
  "$VENV_PY" -c 'import sys, moeopt; from moeopt.passes import PassManager
PassManager(sys.argv[2]).run(moeopt.load(sys.argv[1]), source=sys.argv[1])' "$MODEL" "$pipeline" \
    >"$LOGS/lower-$name.log" 2>&1 || die "lowering $name failed: $(tail -n 1 "$LOGS/lower-$name.log")"
done
log "artifacts ready ($((SECONDS - t0)) s)"

# --- 2. arm64 Debian root (cached) ---------------------------------------------------------------
t0=$SECONDS
ARM64_ROOT=$ROOT DEBIAN_MIRROR=${DEBIAN_MIRROR:-} bash scripts/arm64/root.sh "$LOGS" || exit 1
ROOT=$(realpath "$ROOT")
log "arm64 root ready: $ROOT ($((SECONDS - t0)) s)"

# --- 3. the runtime-only install: moeopt's wheel and its base dependencies for aarch64 -------------
t0=$SECONDS
read -r ORT_V NP_V < <("$VENV_PY" -c 'import numpy, onnxruntime; print(onnxruntime.__version__, numpy.__version__)') \
  || die ".venv has no onnxruntime/numpy: run 'make setup'"
WHEEL=$("$VENV_PY" scripts/runtime_install.py --build-wheel "$BUILD/wheel" 2>"$LOGS/wheel.log") \
  || die "building the moeopt wheel failed: $(tail -n 1 "$LOGS/wheel.log")"
REQS=$("$VENV_PY" -c 'import sys, zipfile
z = zipfile.ZipFile(sys.argv[1]); meta = z.read(next(n for n in z.namelist() if n.endswith("METADATA"))).decode()
print("\n".join(sorted(l for l in meta.splitlines() if l.startswith("Requires-Dist:"))))' "$WHEEL")
SITE=$BUILD/site-deps-$(printf '%s\n%s %s\n' "$REQS" "$ORT_V" "$NP_V" | sha256sum | cut -c1-12)
SITE_MOEOPT=$BUILD/site-moeopt
plat=(--platform manylinux2014_aarch64)
for v in 17 24 26 27 28 31 34 35 36; do plat+=(--platform "manylinux_2_${v}_aarch64"); done  # bookworm: glibc 2.36
pip_arm64=("$VENV_PY" -m pip install --no-cache-dir "${plat[@]}" --python-version 3.11 --implementation cp
           --abi cp311 --only-binary=:all:)
if [ ! -f "$SITE/.ok" ]; then
  log "downloading the runtime's aarch64 wheels (onnxruntime==$ORT_V numpy==$NP_V; log: $LOGS/wheels.log)"
  rm -rf "$SITE.tmp"
  "${pip_arm64[@]}" --target "$SITE.tmp" "$WHEEL" "onnxruntime==$ORT_V" "numpy==$NP_V" >"$LOGS/wheels.log" 2>&1 \
    || die "pip could not get the aarch64 wheels (see $LOGS/wheels.log)"
  rm -rf "$SITE.tmp"/moeopt "$SITE.tmp"/moeopt-*.dist-info  # moeopt itself goes to SITE_MOEOPT, fresh each run
  touch "$SITE.tmp/.ok"
  rm -rf "$SITE" && mv "$SITE.tmp" "$SITE"
fi
[ ! -e "$SITE/torch" ] || die "the runtime install pulled in torch ($SITE/torch)"
rm -rf "$SITE_MOEOPT"
"${pip_arm64[@]}" --no-deps --target "$SITE_MOEOPT" "$WHEEL" >"$LOGS/wheel-install.log" 2>&1 \
  || die "pip could not install $WHEEL for aarch64 (see $LOGS/wheel-install.log)"
log "runtime install ready: $SITE_MOEOPT + $SITE ($((SECONDS - t0)) s)"

# --- 4. parity under qemu-aarch64-static ---------------------------------------------------------
fails=0
runs=0
for cpu in $CPUS; do
  for name in $ARTIFACTS; do
    t0=$SECONDS
    runs=$((runs + 1))
    set +e
    out=$(env -i PATH=/usr/bin:/bin HOME="${HOME:-/root}" LANG=C.UTF-8 \
          PYTHONPATH="$SITE_MOEOPT:$SITE" PYTHONNOUSERSITE=1 PYTHONDONTWRITEBYTECODE=1 \
          qemu-aarch64-static -cpu "$cpu" -L "$ROOT" "$ROOT/usr/bin/python3" \
          "$REPO/scripts/arm64/parity.py" "$BUILD/artifacts/$name" --tol "${TOL[$name]}" 2>&1)
    rc=$?
    set -e
    printf '%s\n' "$out" >"$LOGS/parity-$cpu-$name.log"
    while IFS= read -r line; do log "[$cpu] $name: $line"; done <<<"$out"
    if [ $rc -ne 0 ] || ! grep -q '^platform: aarch64 ' <<<"$out"; then
      fails=$((fails + 1))
      log "[$cpu] $name: FAIL (exit $rc, $((SECONDS - t0)) s)"
    else
      log "[$cpu] $name: ok ($((SECONDS - t0)) s)"
    fi
  done
done

# --- 5. the moeopt command without torch on the committed tiny artifacts ---------------------------
cpu=${CPUS%% *}
arm_py() {
  env -i PATH=/usr/bin:/bin HOME="${HOME:-/root}" LANG=C.UTF-8 TOKENIZERS_PARALLELISM=false \
      PYTHONPATH="$SITE_MOEOPT:$SITE" PYTHONNOUSERSITE=1 PYTHONDONTWRITEBYTECODE=1 \
      qemu-aarch64-static -cpu "$cpu" -L "$ROOT" "$ROOT/usr/bin/python3" "$@"
}
runtime_check() {  # NAME COMMAND...: one check, logged; counts a failure
  local name=$1 out rc
  shift
  t0=$SECONDS
  runs=$((runs + 1))
  set +e
  out=$("$@" 2>&1)
  rc=$?
  set -e
  printf '%s\n' "$out" >"$LOGS/runtime-$cpu-$name.log"
  if [ $rc -ne 0 ]; then
    fails=$((fails + 1))
    log "[$cpu] runtime $name: FAIL (exit $rc, $((SECONDS - t0)) s): $(tail -n 1 <<<"$out")"
  else
    log "[$cpu] runtime $name: ok ($((SECONDS - t0)) s)"
  fi
}
no_torch() { ! arm_py -c 'import torch' 2>/dev/null; }
run_tiny() {  # ARTIFACT [run options]: moeopt run's tokens must be parity.npz's
  local art=$1 ids want got
  shift
  read -r ids want < <("$VENV_PY" -c 'import sys, numpy as np
z = np.load(sys.argv[1] + "/parity.npz")
print(",".join(map(str, z["prompt"][0])), " ".join(map(str, z["tokens"][0])))' "$art")
  got=$(arm_py -m moeopt.cli run "$art" --ids "$ids" --max-new-tokens 8 "$@") || { echo "$got"; return 1; }
  got=$(head -n 1 <<<"$got" | xargs)
  [ "$got" = "$want" ] || { echo "moeopt run $art: tokens '$got', parity.npz '$want'"; return 1; }
  echo "tokens $got (= parity.npz)"
}
FIX=$REPO/tests/fixtures
runtime_check no-torch no_torch
runtime_check run-tiny run_tiny "$FIX/tiny-artifact"
runtime_check run-tiny-offload run_tiny "$FIX/tiny-artifact-offload" --budget 30KB --policy lru
runtime_check eval-tiny arm_py -m moeopt.cli eval "$FIX/tiny-artifact" --data "$FIX/data" --ppl news \
  --tasks intent --ppl-tokens 200 --app-examples 8

total=$((SECONDS - t_start))
if [ $fails -ne 0 ]; then
  echo "test-arm64: $fails of $runs checks failed under qemu-aarch64 (logs: $LOGS) in ${total} s" >&2
  exit 1
fi
log "$runs passed, 0 failed (aarch64 under qemu, cpus: $CPUS) in ${total} s"
