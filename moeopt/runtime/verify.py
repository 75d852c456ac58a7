"""`moeopt verify ARTIFACT`: check every byte of an artifact against its manifest, on demand.

Opening an artifact checks every file's size and sha256, except an offload artifact's expert file:
that one is checked record by record as records are read (`moeopt.runtime.offload_format`), so a start
reads no expert. This is the complete check, for after a copy to a device, or before a release: every
listed file's size and sha256, and, for an offload artifact, each expert record's place in the file and
its crc32. The expert file is read once, each chunk feeding both its sha256 and the crc32 of the
records it holds. Torch-free: it runs on the runtime-only install.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from moeopt.errors import MoeOptError, VerificationError
from moeopt.runtime.manifest import read_manifest, sha256_file
from moeopt.runtime.offload_format import OffloadIndex

_CHUNK = 1 << 22
Span = tuple[int, int, tuple[int, int]]  # (first byte, end byte, (layer, slot))


@dataclass
class VerifyReport:
    """What `verify_artifact` found: `problems` (one line each; empty when the artifact is sound)."""

    folder: Path
    problems: list[str] = field(default_factory=list)
    files: int = 0  # files whose sha256 was computed
    bytes: int = 0  # bytes hashed
    records: int = 0  # expert records in the offload index (0: resident artifact)
    unchecksummed: int = 0  # records without a crc32 (an artifact from before the checksums)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        text = f"{self.folder}: ok: {self.files} files ({self.bytes / 2**20:.1f} MiB) match their sha256"
        checked = self.records - self.unchecksummed
        if checked:
            text += f"; {checked} expert records match their crc32"
        if self.unchecksummed:
            text += (f"; {self.unchecksummed} expert records have no crc32 (written before per-record checksums: "
                     "the expert file's sha256 covers them)")
        return text


def _scan(path: Path, spans: list[Span]) -> tuple[str, dict[tuple[int, int], int], set[tuple[int, int]]]:
    """One sequential read of `path`: its sha256, the crc32 of each span's bytes, and the spans read whole
    (a span that is not ends past the end of the file)."""
    spans = sorted(spans)
    h = hashlib.sha256()
    crcs = {key: 0 for _, _, key in spans}
    whole: set[tuple[int, int]] = set()
    active: list[Span] = []
    pos = nxt = 0
    with path.open("rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            end = pos + len(chunk)
            h.update(chunk)
            while nxt < len(spans) and spans[nxt][0] < end:
                active.append(spans[nxt])
                nxt += 1
            view = memoryview(chunk)
            keep = []
            for span in active:
                start, stop, key = span
                lo, hi = max(start, pos), min(stop, end)
                if lo < hi:
                    crcs[key] = zlib.crc32(view[lo - pos:hi - pos], crcs[key])
                if stop > end:
                    keep.append(span)
                else:
                    whole.add(key)
            active, pos = keep, end
    whole.update(key for start, stop, key in spans if start == stop and start <= pos)  # empty records
    return h.hexdigest(), crcs, whole


def _records(index: OffloadIndex, report: VerifyReport) -> tuple[list[Span], dict[tuple[int, int], int]]:
    """The expert records' byte spans, and their crc32s from the index; misplaced records are problems."""
    spans: list[Span] = []
    want: dict[tuple[int, int], int] = {}
    for key, rec in sorted(index.experts.items()):
        end = rec.offset + index.formats[rec.format].expert_bytes
        if rec.offset < 0 or rec.offset % index.page or end > index.file_bytes:
            report.problems.append(f"{report.folder / index.file}: layer {key[0]} slot {key[1]}: record at byte "
                                   f"{rec.offset} is not page-aligned or ends past the file's "
                                   f"{index.file_bytes} bytes")
            continue
        spans.append((rec.offset, end, key))
        if rec.crc32 is None:
            report.unchecksummed += 1
        else:
            want[key] = rec.crc32
    return spans, want


def verify_artifact(folder: str | Path) -> VerifyReport:
    """Check every file the manifest lists (size, sha256) and every expert record (place, crc32).

    Raises:
        BadInputError: no artifact there, or a manifest that cannot be read (nothing else can be checked).
    """
    report = VerifyReport(Path(folder))
    manifest = read_manifest(report.folder, verify=False)
    files: dict[str, Any] = manifest.get("files") or {}
    if not files:
        report.problems.append(f"{report.folder / 'manifest.json'}: lists no files to check")
    index: OffloadIndex | None = None
    spans: list[Span] = []
    want: dict[tuple[int, int], int] = {}
    if manifest.get("offload") is not None:
        try:
            index = OffloadIndex.from_manifest(manifest)
        except (MoeOptError, KeyError, TypeError, ValueError) as e:
            report.problems.append(f"{report.folder / 'manifest.json'}: unreadable offload index ({e})")
        else:
            report.records = len(index.experts)
            spans, want = _records(index, report)
            if index.file not in files:
                report.problems.append(f"{report.folder / index.file}: the expert file is not in the manifest's "
                                       "file list")
    for rel, entry in sorted(files.items()):
        path = report.folder / rel
        if not path.is_file():
            report.problems.append(f"{path}: missing")
            continue
        size = path.stat().st_size
        if size != entry.get("bytes"):
            report.problems.append(f"{path}: {size} bytes, the manifest says {entry.get('bytes')}")
        if index is not None and rel == index.file:
            digest, crcs, whole = _scan(path, spans)
            for key in sorted(want):
                start = index.experts[key].offset
                if key not in whole:
                    report.problems.append(f"{path}: layer {key[0]} slot {key[1]}: record at byte {start} is cut "
                                           "off by the end of the file")
                elif crcs[key] != want[key]:
                    report.problems.append(f"{path}: layer {key[0]} slot {key[1]} (record at byte {start}): crc32 "
                                           "differs from the manifest")
        else:
            digest = sha256_file(path)
        report.files += 1
        report.bytes += size
        if digest != entry.get("sha256"):
            report.problems.append(f"{path}: sha256 differs from the manifest")
    return report


def verify_cmd(
    artifact: Annotated[Path, typer.Argument(help="artifact folder written by `moeopt lower`")],
) -> None:
    """Check every file's sha256 and every expert record's crc32 against the manifest (reads it all).

    Prints one line per problem and exits with code 2, or prints a one-line summary (exit 0).
    """
    report = verify_artifact(artifact)
    for line in report.problems:
        print(line)
    if not report.ok:
        n = len(report.problems)
        raise VerificationError(f"{artifact}: {n} problem{'s' if n > 1 else ''} found (listed above); do not run "
                                "this artifact: copy or lower it again")
    print(report.summary())


def check_artifact(folder: str | Path) -> None:
    """`verify_artifact`, raising its first problem (the lowering's check of what it has just written).

    Raises:
        VerificationError: one line naming the first problem and how many there are.
    """
    report = verify_artifact(folder)
    if not report.ok:
        more = len(report.problems) - 1
        raise VerificationError(report.problems[0] + (f" (and {more} more problems)" if more else ""))
