"""The packed expert file of an offload artifact, read one record at a time straight into pool frames.

Each read is a single ``os.preadv`` of a record's parts into the frame views of the pool arrays: no
intermediate buffer, no unpacking, and the GIL is released while the kernel copies, so loads on an I/O
thread overlap ONNX Runtime compute on the main thread.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from moeopt.errors import BadInputError
from moeopt.runtime.offload_format import OffloadIndex


class ExpertStore:
    """Open ``index.file`` in an artifact folder, check it against the index, and read records by offset."""

    def __init__(self, folder: str | Path, index: OffloadIndex) -> None:
        self.index = index
        self.path = Path(folder) / index.file
        if not self.path.is_file():
            raise BadInputError(f"expert file {self.path} is missing (the offload index expects "
                                f"{index.file_bytes} bytes)")
        size = self.path.stat().st_size
        if size < index.file_bytes:
            raise BadInputError(f"expert file {self.path} is truncated: {size} bytes, expected "
                                f"{index.file_bytes} bytes")
        for (layer, slot), rec in index.experts.items():
            end = rec.offset + index.formats[rec.format].expert_bytes
            if rec.offset % index.page or end > index.file_bytes:
                raise BadInputError(f"offload index: layer {layer} slot {slot} record at byte {rec.offset} "
                                    f"is not page-aligned or ends past {index.file} ({index.file_bytes} bytes)")
        self._fd: int | None = os.open(self.path, os.O_RDONLY)

    def read_into(self, layer: int, slot: int, frame_views: Sequence[np.ndarray]) -> int:
        """Read expert ``(layer, slot)`` into `frame_views` (one C-contiguous view per part, in format
        order) with one ``os.preadv``; returns the bytes read.

        Raises:
            BadInputError: not a cold expert, views that do not match its format, or a short read.
        """
        rec = self.index.experts.get((layer, slot))
        if rec is None:
            raise BadInputError(f"layer {layer} slot {slot} is not a cold expert of the offload index")
        fmt = self.index.formats[rec.format]
        if len(frame_views) != len(fmt.parts) or any(
                v.nbytes != p.nbytes or not v.flags.c_contiguous for v, p in zip(frame_views, fmt.parts, strict=False)):
            raise BadInputError(f"frame views do not match format {fmt.name} of layer {layer} slot {slot}")
        if self._fd is None:
            raise BadInputError(f"expert file {self.path} is closed")
        bufs = [memoryview(v.reshape(-1).view(np.uint8)) for v in frame_views]  # type: ignore[arg-type]
        n = os.preadv(self._fd, bufs, rec.offset)
        if n != fmt.expert_bytes:
            raise BadInputError(f"expert file {self.path} is truncated: layer {layer} slot {slot} needs bytes "
                                f"{rec.offset}..{rec.offset + fmt.expert_bytes} but only {n} could be read")
        return n

    def drop_page_cache(self) -> None:
        """Ask the kernel to drop the file's cached pages so later reads come from storage (no root)."""
        if self._fd is not None:
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ExpertStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
