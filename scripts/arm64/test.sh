#!/usr/bin/env bash
# make test-arm64: the plain-onnxruntime parity check (scripts/run_artifact.py --parity) on ARM64,
# emulated on an x86-64 host. It checks that onnxruntime's aarch64 kernels give the same tokens and
# logits as PyTorch on artifacts of the reference model; its timings mean nothing (qemu emulation).
#
#   1. host (.venv): lower moeopt/assets/reference-moe for --target arm64: float, 4-bit (QMoE,
#      accuracy level 0) and 4-bit with int8 activations (accuracy level 4: the ARM int8 dot-product
#      kernels) into build/arm64/artifacts/ (rebuilt when moeopt/ or the model is newer).
#   2. an arm64 Debian 12 (bookworm, Python 3.11) root, made once by debootstrap's first stage
#      (root.sh; cached in build/arm64/root).
#   3. the aarch64 onnxruntime and numpy wheels from PyPI, the same versions as .venv, installed
#      on the host with pip's --platform into build/arm64/site-ort*-np* (no arm64 code runs).
#   4. scripts/arm64/parity.py (prints platform.machine(), then runs run_artifact.py --parity) under
#      qemu-aarch64-static -L ROOT for each artifact and each emulated CPU in ARM64_CPUS.
#
# Settings (environment): ARM64_BUILD (build/arm64), ARM64_ROOT (ARM64_BUILD/root), ARM64_CPUS
# ("cortex-a72 max": plain NEON, and every feature qemu emulates: dotprod, i8mm, bf16, SVE2),
# ARM64_ARTIFACTS ("float q4 q4-int8"), ARM64_KEEP_ARTIFACTS=1 (reuse built artifacts even when
# moeopt/ is newer, skipping ~4 minutes of lowering), DEBIAN_MIRROR. Needs root (or sudo) for
# apt-get and debootstrap the first time. Exit status 0 when every parity check passes, 1 otherwise;
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

# --- 3. aarch64 wheels, pinned to the host's versions --------------------------------------------
t0=$SECONDS
read -r ORT_V NP_V < <("$VENV_PY" -c 'import numpy, onnxruntime; print(onnxruntime.__version__, numpy.__version__)') \
  || die ".venv has no onnxruntime/numpy: run 'make setup'"
SITE=$BUILD/site-ort$ORT_V-np$NP_V
if [ ! -f "$SITE/.ok" ]; then
  log "downloading aarch64 wheels onnxruntime==$ORT_V numpy==$NP_V (log: $LOGS/wheels.log)"
  rm -rf "$SITE.tmp"
  plat=(--platform manylinux2014_aarch64)
  for v in 17 24 26 27 28 31 34 35 36; do plat+=(--platform "manylinux_2_${v}_aarch64"); done  # bookworm: glibc 2.36
  "$VENV_PY" -m pip install --no-cache-dir --target "$SITE.tmp" "${plat[@]}" --python-version 3.11 \
      --implementation cp --abi cp311 --only-binary=:all: "onnxruntime==$ORT_V" "numpy==$NP_V" \
      >"$LOGS/wheels.log" 2>&1 || die "pip could not get the aarch64 wheels (see $LOGS/wheels.log)"
  touch "$SITE.tmp/.ok"
  rm -rf "$SITE" && mv "$SITE.tmp" "$SITE"
fi
log "wheels ready: $SITE ($((SECONDS - t0)) s)"

# --- 4. parity under qemu-aarch64-static ---------------------------------------------------------
fails=0
runs=0
for cpu in $CPUS; do
  for name in $ARTIFACTS; do
    t0=$SECONDS
    runs=$((runs + 1))
    set +e
    out=$(env -i PATH=/usr/bin:/bin HOME="${HOME:-/root}" LANG=C.UTF-8 \
          PYTHONPATH="$SITE" PYTHONNOUSERSITE=1 PYTHONDONTWRITEBYTECODE=1 \
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

total=$((SECONDS - t_start))
if [ $fails -ne 0 ]; then
  echo "test-arm64: $fails of $runs parity checks failed under qemu-aarch64 (logs: $LOGS) in ${total} s" >&2
  exit 1
fi
log "$runs passed, 0 failed (aarch64 under qemu, cpus: $CPUS) in ${total} s"
