"""Cheap integrity checks of safetensors files and shard indexes before anything trusts them.

Everything here reads headers only (8 bytes + a JSON header per shard, and the index): it costs
milliseconds whatever the checkpoint's size, and it is all `moeopt inspect` needs to know every
tensor's name, dtype, shape and bytes.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeopt.errors import BadInputError

INDEX_FILE = "model.safetensors.index.json"
# Bytes per element of the safetensors dtypes (sub-byte ones do not occur in the checkpoints moeopt reads).
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies: its shard, dtype, shape and absolute byte range in the file."""

    shard: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file; a one-line BadInputError if it is truncated or corrupt.

    safetensors' own loader reports a truncated file as a bare deserialisation error deep inside
    transformers; reading the 8-byte header length and the JSON header lets the message name the file
    and what is wrong.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise BadInputError(f"corrupt safetensors file {path}: only {size} bytes, no header")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise BadInputError(f"truncated safetensors file {path}: header of {n} bytes but file has {size}")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInputError(f"corrupt safetensors file {path}: unreadable header ({e.__class__.__name__})") from e
    except OSError as e:
        raise BadInputError(f"cannot read safetensors file {path}: {e.strerror or e.__class__.__name__}") from e
    if not isinstance(header, dict):
        raise BadInputError(f"corrupt safetensors file {path}: header is not a JSON object")
    out: dict[str, TensorInfo] = {}
    try:
        for key, v in header.items():
            if key == "__metadata__":
                continue
            begin, end = (int(x) for x in v["data_offsets"])
            shape = tuple(int(d) for d in v["shape"])
            out[key] = TensorInfo(path, str(v["dtype"]), shape, 8 + n + begin, 8 + n + end)
    except (KeyError, TypeError, ValueError) as e:
        raise BadInputError(f"corrupt safetensors file {path}: malformed entry in its header ({e!r:.80})") from e
    end = max((t.end for t in out.values()), default=8 + n)
    if end > size:
        raise BadInputError(f"truncated safetensors file {path}: tensors need {end} bytes, file has {size}")
    for key, t in out.items():
        width = DTYPE_BYTES.get(t.dtype)
        if width is not None and t.numel * width != t.nbytes:
            raise BadInputError(
                f"corrupt safetensors file {path}: tensor '{key}' of shape {list(t.shape)} {t.dtype} "
                f"spans {t.nbytes} bytes, not {t.numel * width}"
            )
    return out


def check_safetensors(path: Path) -> None:
    """Raise a one-line BadInputError if the file is truncated or its header is corrupt."""
    read_header(path)


def checkpoint_tensors(folder: Path) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint folder's safetensors shards, from their headers (and the index).

    With a `model.safetensors.index.json`, every shard it names must exist and hold the tensors the
    index maps to it; a missing, truncated or corrupt shard is a one-line BadInputError naming it.
    Without one, every `*.safetensors` file in the folder is read.
    """
    index = folder / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise BadInputError(f"{index}: corrupt shard index ({e.__class__.__name__})") from e
        shards: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            shards.setdefault(str(shard), []).append(key)
        for shard in shards:
            if not (folder / shard).is_file():
                raise BadInputError(f"{folder}: shard {shard} named in {INDEX_FILE} is missing")
        files = [folder / s for s in shards]
    else:
        shards = {}
        files = sorted(folder.glob("*.safetensors"))
    out: dict[str, TensorInfo] = {}
    for path in files:
        header = read_header(path)
        for key in shards.get(path.name, []):
            if key not in header:
                raise BadInputError(f"{path}: lacks tensor '{key}' that {INDEX_FILE} places in it")
        out.update(header)
    return out


def header_summary(tensors: dict[str, TensorInfo]) -> dict[str, Any]:
    """Totals of a checkpoint's tensors: count, files, elements and bytes per dtype."""
    by_dtype: dict[str, int] = {}
    for t in tensors.values():
        by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.nbytes
    return {"tensors": len(tensors), "files": len({t.shard for t in tensors.values()}),
            "numel": sum(t.numel for t in tensors.values()), "bytes": sum(by_dtype.values()),
            "bytes_by_dtype": by_dtype}
