#!/usr/bin/env bash
# An arm64 Debian 12 (bookworm: Python 3.11) root that runs under qemu-aarch64-static -L ROOT without
# binfmt_misc and without chroot, made once and cached:
#
#   bash scripts/arm64/root.sh [LOGDIR]     # ARM64_ROOT (default build/arm64/root), DEBIAN_MIRROR
#
# debootstrap --foreign (its first stage) only downloads and unpacks: no arm64 code runs, so it works
# on any host. It unpacks the required packages but only downloads the --include ones (python3 and
# its libraries); those are unpacked here with dpkg-deb -x. The second stage (maintainer scripts)
# would need a chroot with binfmt_misc; Python needs none of it to run.
#
# /proc/cpuinfo: qemu-user (7.2, Debian 12) shows arm64 programs the host's x86 /proc/cpuinfo, in which
# onnxruntime's cpuinfo library finds no ARM core and crashes (SIGSEGV while importing onnxruntime).
# qemu -L looks up absolute paths under ROOT first, so ROOT/proc/cpuinfo (a plain file written here,
# two Cortex-A72-like cores) is what the emulated program reads. CPU features come from qemu's -cpu
# (the auxiliary vector), not from this file.
set -euo pipefail
cd "$(dirname "$0")/../.."

ROOT=${ARM64_ROOT:-build/arm64/root}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
[ -n "$MIRROR" ] || MIRROR=http://deb.debian.org/debian
LOGS=${1:-$(dirname "$ROOT")/logs}
STAMP=$ROOT/.moeopt-arm64-root

die() { echo "test-arm64: error: $*" >&2; exit 1; }

[ -f "$STAMP" ] && exit 0

mkdir -p "$LOGS" "$(dirname "$ROOT")"
command -v debootstrap >/dev/null || die "debootstrap is missing (apt-get install debootstrap)"
command -v qemu-aarch64-static >/dev/null || die "qemu-aarch64-static is missing (apt-get install qemu-user-static)"
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo

TMP=$ROOT.tmp
echo "test-arm64: making the arm64 $SUITE root in $ROOT (debootstrap first stage; log: $LOGS/debootstrap.log)"
$SUDO rm -rf "$TMP"
$SUDO debootstrap --foreign --arch=arm64 --variant=minbase --include=python3 "$SUITE" "$TMP" "$MIRROR" \
  >"$LOGS/debootstrap.log" 2>&1 || die "debootstrap --foreign --arch=arm64 failed: $(tail -n 1 "$LOGS/debootstrap.log") (see $LOGS/debootstrap.log)"

# Unpack every downloaded package (the required ones again: harmless), then drop the .deb files.
for deb in "$TMP"/var/cache/apt/archives/*.deb; do
  $SUDO dpkg-deb -x "$deb" "$TMP" || die "dpkg-deb -x $deb failed"
done
$SUDO rm -f "$TMP"/var/cache/apt/archives/*.deb
[ -e "$TMP/usr/bin/python3" ] || die "the arm64 root has no usr/bin/python3 after unpacking"

cpuinfo=""
for i in 0 1; do
  cpuinfo+="processor	: $i
BogoMIPS	: 100.00
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid
CPU implementer	: 0x41
CPU architecture: 8
CPU variant	: 0x0
CPU part	: 0xd08
CPU revision	: 3

"
done
$SUDO mkdir -p "$TMP/proc"
printf '%s' "$cpuinfo" | $SUDO tee "$TMP/proc/cpuinfo" >/dev/null

TMP_ABS=$(realpath "$TMP")
machine=$(env -i PATH=/usr/bin:/bin qemu-aarch64-static -L "$TMP_ABS" "$TMP_ABS/usr/bin/python3" \
  -c 'import platform; print(platform.machine())' 2>&1) || die "the arm64 python3 does not run under qemu-aarch64-static: $machine"
[ "$machine" = aarch64 ] || die "the arm64 python3 reports machine '$machine', not aarch64"

$SUDO rm -rf "$ROOT"
$SUDO mv "$TMP" "$ROOT"
echo "$SUITE $MIRROR $(date -u +%FT%TZ)" | $SUDO tee "$STAMP" >/dev/null
