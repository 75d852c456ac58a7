"""Weights read tensor by tensor from a checkpoint's safetensors shards, only when asked, in their own dtype.

Each read is one `pread` of the tensor's byte range (from the shard headers, `safetensors_check`), copied
into a tensor of the stored dtype; upcasting is the caller's, one tensor at a time. Reading by file I/O
rather than through safetensors' mmap keeps the shard pages out of this process's resident set: a mapped
shard that has been read counts in RSS until it is unmapped, which for a 3 GB decoder layer doubles the
footprint the streamed compile is measured by.

The reader also keeps the book of which decoder layers hold materialised routed experts
(`acquire` / `release`): the streamed compile promises at most `max_layers` at once, and a breach raises
instead of silently using the memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from moeopt.errors import BadInputError
from moeopt.ir.safetensors_check import TensorInfo, checkpoint_tensors

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class LayerBudgetError(RuntimeError):
    """More decoder layers materialised at once than the streamed compile allows (a bug, not bad input)."""


class LazyCheckpoint:
    """The tensors of a checkpoint folder, read on demand.

    Args:
        folder: a Hugging Face checkpoint folder; every shard named by its index is checked (present, not
            truncated, headers readable) before anything is read.
        max_layers: decoder layers whose routed experts may be materialised at once.
    """

    def __init__(self, folder: Path, *, max_layers: int = 2) -> None:
        self.folder = folder
        self.tensors: dict[str, TensorInfo] = checkpoint_tensors(folder)
        self.bytes_read = 0
        self.max_layers = max_layers
        self.live: set[int] = set()
        self.peak_live = 0
        self.hooks: list[Callable[[frozenset[int]], None]] = []  # called with the live set after each change

    def has(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise BadInputError(f"{self.folder}: checkpoint lacks tensor '{name}'") from None

    def read(self, name: str, dtype: torch.dtype | None = None, row: int | None = None) -> torch.Tensor:
        """Tensor `name` (or its `row`-th slice along the first dimension), in `dtype` (default: as stored)."""
        info = self.info(name)
        stored = _DTYPES.get(info.dtype)
        if stored is None:
            raise BadInputError(f"{self.folder}: tensor '{name}' is {info.dtype}, which the streamed compile "
                                "does not read")
        begin, end, shape = info.begin, info.end, info.shape
        if row is not None:
            step = (end - begin) // shape[0]
            begin, end, shape = begin + row * step, begin + (row + 1) * step, shape[1:]
        n = end - begin
        buf = bytearray(n)
        with open(info.shard, "rb", buffering=0) as f:
            got = os.preadv(f.fileno(), [buf], begin) if n else 0
        if got != n:
            raise BadInputError(f"truncated safetensors file {info.shard}: tensor '{name}' ends past the file")
        self.bytes_read += n
        t = torch.frombuffer(buf, dtype=stored) if n else torch.empty(0, dtype=stored)
        t = t.reshape(shape)
        return t if dtype is None or dtype == stored else t.to(dtype)

    def acquire(self, layer: int) -> None:
        """Decoder layer `layer`'s routed experts are about to be materialised."""
        self.live.add(layer)
        self.peak_live = max(self.peak_live, len(self.live))
        for hook in self.hooks:
            hook(frozenset(self.live))
        if len(self.live) > self.max_layers:
            raise LayerBudgetError(f"decoder layers {sorted(self.live)} materialised at once, more than "
                                   f"{self.max_layers}")

    def release(self, layer: int) -> None:
        self.live.discard(layer)
        for hook in self.hooks:
            hook(frozenset(self.live))
