"""Cheap integrity checks of safetensors files before anything trusts them."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from moeopt.errors import BadInputError


def check_safetensors(path: Path) -> None:
    """Raise a one-line BadInputError if the file is truncated or its header is corrupt.

    safetensors' own loader reports a truncated file as a bare deserialisation error deep inside
    transformers; reading the 8-byte header length and the JSON header costs microseconds and lets the
    message name the file and what is wrong.
    """
    size = path.stat().st_size
    try:
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
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise BadInputError(f"truncated safetensors file {path}: tensors need {8 + n + end} bytes, file has {size}")
