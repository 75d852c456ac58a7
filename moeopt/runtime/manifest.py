"""The artifact manifest: its constants, file hashing, and the check a reader runs before trusting it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from moeopt.errors import BadInputError

FORMAT = "moeopt-artifact"
VERSION = 1
MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
PARITY_FILE = "parity.npz"  # PyTorch reference tokens/logits on a fixed prompt
_CHUNK = 1 << 22


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def hash_files(folder: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {sha256, bytes}} of every file under `folder` except the manifest itself."""
    out: dict[str, dict[str, Any]] = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out[p.relative_to(folder).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return out


def record_checked_files(manifest: dict[str, Any]) -> set[str]:
    """Files whose bytes are checked record by record as they are read, so opening need not hash them:
    an offload artifact's expert file when every record in its index has a ``crc32``
    (`moeopt.runtime.offload_format`). Empty for a resident artifact and for an offload artifact written
    before the checksums (its expert file is hashed whole, as then)."""
    sec = manifest.get("offload")
    if not isinstance(sec, dict):
        return set()
    experts = sec.get("experts")
    if not isinstance(experts, list) or not experts or not isinstance(sec.get("file"), str):
        return set()
    if not all(isinstance(e, dict) and isinstance(e.get("crc32"), int) for e in experts):
        return set()
    return {sec["file"]}


def read_manifest(folder: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """Load `folder/manifest.json`; with `verify`, check every listed file's size and sha256, except the
    sha256 of a file checked record by record when read (`record_checked_files`: an offload artifact's
    experts.bin, whose every byte would otherwise be read at every start). ``moeopt verify``
    (`moeopt.runtime.verify`) checks everything.

    Raises:
        BadInputError: one line naming the missing, truncated or corrupted file.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise BadInputError(f"{folder}: no such artifact folder")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadInputError(f"{folder}: not a moeopt artifact (no {MANIFEST}); build one with `moeopt lower`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInputError(f"{path}: corrupt manifest ({e.__class__.__name__})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BadInputError(f"{path}: not a moeopt artifact manifest")
    if int(manifest.get("version", -1)) > VERSION:
        raise BadInputError(f"{path}: artifact format v{manifest.get('version')} is newer than this moeopt reads")
    if verify:
        by_record = record_checked_files(manifest)
        for rel, entry in manifest.get("files", {}).items():
            p = folder / rel
            if not p.is_file():
                raise BadInputError(f"{p}: missing artifact file")
            size = p.stat().st_size
            if size != entry["bytes"]:
                raise BadInputError(f"{p}: truncated or altered ({size} bytes, manifest says {entry['bytes']})")
            if rel not in by_record and sha256_file(p) != entry["sha256"]:
                raise BadInputError(f"{p}: corrupted (sha256 differs from the manifest)")
    return manifest
