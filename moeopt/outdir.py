"""Output folders: built in a temporary sibling, renamed into place, and never replacing a user's files.

Every command that writes a folder (checkpoint, artifact, adapter) goes through here. An existing
non-empty folder is refused unless `overwrite` is asked for, and even then only a folder that moeopt
wrote (its marker file names a moeopt format) is replaced: a typo in `-o` must not delete a user's data.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

from moeopt.errors import BadInputError

# file -> the "format" it holds when moeopt wrote the folder: artifact manifest, checkpoint, LoRA adapter
MARKERS = {"manifest.json": "moeopt-artifact", "moeopt.json": "moeopt-checkpoint",
           "moeopt-adapter.json": "moeopt-adapter",
           "moeopt-import.json": "moeopt-import"}


def written_by_moeopt(folder: Path) -> bool:
    """Whether `folder` holds one of moeopt's marker files with moeopt's format in it."""
    for name, fmt in MARKERS.items():
        try:
            meta = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and meta.get("format") == fmt:
            return True
    return False


def check_out_dir(final: Path, *, overwrite: bool) -> None:
    """Refuse an output folder that writing would destroy: non-empty without `overwrite`, or not moeopt's.

    Raises:
        BadInputError: one line naming the folder and what to do.
    """
    if not final.exists():
        return
    if not final.is_dir():
        raise BadInputError(f"{final}: exists and is not a folder; choose another output folder")
    if not any(final.iterdir()):
        return
    if not overwrite:
        raise BadInputError(f"{final}: the output folder exists and is not empty; give --overwrite "
                            "(overwrite=True) to replace a folder moeopt wrote, or choose another folder")
    if not written_by_moeopt(final):
        names = " or ".join(MARKERS)
        raise BadInputError(f"{final}: not a folder moeopt wrote (no moeopt {names}); refusing to replace it "
                            "even with --overwrite; choose another output folder")


def atomic_dir(final: Path, *, overwrite: bool = False) -> Path:
    """A fresh temporary sibling folder; `commit_dir` renames it into place.

    `final` is checked first (see `check_out_dir`), so a refused folder costs no work.
    """
    check_out_dir(final, overwrite=overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def commit_dir(tmp: Path, final: Path, *, overwrite: bool = False) -> None:
    """Rename `tmp` to `final`; an existing moeopt folder is removed only once the new one is in place.

    `final` is checked again: it may have appeared while `tmp` was being written.
    """
    check_out_dir(final, overwrite=overwrite)
    if final.exists() and not any(final.iterdir()):
        final.rmdir()
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


OVERWRITE_HELP = "replace an existing output folder that moeopt wrote (a folder of other files is never replaced)"
