"""The packed expert file of an offload artifact, read one record at a time straight into pool frames.

Each read is a single ``os.preadv`` of a record's parts into the frame views of the pool arrays: no
intermediate buffer, no unpacking, and the GIL is released while the kernel copies, so loads on an I/O
thread overlap ONNX Runtime compute on the main thread. A record with a checksum in the index (``crc32``,
see `moeopt.runtime.offload_format`) is checked right after it is read, before anything computes with it:
a damaged record is refused with one line when, and only when, some step needs it. Opening the store
reads no record (only the file's size is checked), and `reads` counts the reads of each record.

With ``page_cache=False`` a record's pages leave the page cache as soon as it is read
(``posix_fadvise(DONTNEED)`` of its range, and no readahead past it, ``POSIX_FADV_RANDOM``): the expert
then lives once in memory, in its frame, instead of twice (frame + cached file pages). Where memory is
tight (a board, or a memory cgroup, which charges the page cache to the group) the cached copy only
pushes other pages out; where it is not, it makes a re-read after an eviction a memory copy, so the
default keeps it.

`SlowStorage` makes the store behave like a slower device than the one it sits on (an edge board's SD
card or eMMC): every read takes at least ``latency + bytes / bandwidth`` and reads are served one at a
time in the order they were asked for, as by a single-queue device. It is a model for benchmarks, not
a measurement: the real read still happens, and the store sleeps (GIL released) for the rest.
"""

from __future__ import annotations

import os
import threading
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from moeopt.errors import BadInputError
from moeopt.runtime.offload_format import OffloadIndex


class SlowStorage:
    """A single-queue storage device of `bandwidth` bytes/s and `latency` seconds per read.

    ``finish(start, nbytes)`` books the device for one read asked for at `start` (a ``perf_counter``
    time) and returns when that read completes: after the read booked before it, plus its own latency
    and transfer time. Thread-safe.
    """

    def __init__(self, bandwidth: float, latency: float = 0.0) -> None:
        if not bandwidth > 0 or not latency >= 0:
            raise BadInputError(f"storage model: bandwidth must be > 0 bytes/s and latency >= 0 s, got "
                                f"{bandwidth} and {latency}")
        self.bandwidth, self.latency = float(bandwidth), float(latency)
        self._free_at = 0.0
        self._lock = threading.Lock()

    def finish(self, start: float, nbytes: int) -> float:
        with self._lock:
            self._free_at = max(start, self._free_at) + self.latency + nbytes / self.bandwidth
            return self._free_at

    def wait(self, start: float, nbytes: int) -> None:
        """Sleep until the read of `nbytes` asked for at `start` would have completed on this device."""
        rest = self.finish(start, nbytes) - time.perf_counter()
        if rest > 0:
            time.sleep(rest)


class ExpertStore:
    """Open ``index.file`` in an artifact folder, check its size against the index, and read records by
    offset, each checked against its crc32 when the index has one.

    With `storage`, every read also waits as long as that device model says it would take; with
    `page_cache` False, the pages of each record read are dropped from the page cache.
    """

    def __init__(self, folder: str | Path, index: OffloadIndex, storage: SlowStorage | None = None, *,
                 page_cache: bool = True) -> None:
        self.index = index
        self.storage = storage
        self.page_cache = page_cache
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
        if not page_cache:
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead into the next record
        self.reads: Counter[tuple[int, int]] = Counter()  # (layer, slot) -> reads of that record so far
        self._reads_lock = threading.Lock()

    def read_into(self, layer: int, slot: int, frame_views: Sequence[np.ndarray]) -> int:
        """Read expert ``(layer, slot)`` into `frame_views` (one C-contiguous view per part, in format
        order) with one ``os.preadv``; returns the bytes read.

        Raises:
            BadInputError: not a cold expert, views that do not match its format, a short read, or bytes
                whose crc32 differs from the index's (the views then hold the damaged bytes).
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
        start = time.perf_counter()
        # the whole record is wanted: ask for it at once (large requests queued together) rather than let
        # the read fault it in readahead windows: 1.7-2.1 GB/s against 0.3-0.8 GB/s for 100 MB records
        # (8x7B-shaped experts, this machine's virtual disk, page cache dropped)
        os.posix_fadvise(self._fd, rec.offset, fmt.record_bytes, os.POSIX_FADV_WILLNEED)
        n = os.preadv(self._fd, bufs, rec.offset)
        if not self.page_cache:
            os.posix_fadvise(self._fd, rec.offset, fmt.record_bytes, os.POSIX_FADV_DONTNEED)
        if self.storage is not None:
            self.storage.wait(start, n)
        with self._reads_lock:
            self.reads[(layer, slot)] += 1
        if n != fmt.expert_bytes:
            raise BadInputError(f"expert file {self.path} is truncated: layer {layer} slot {slot} needs bytes "
                                f"{rec.offset}..{rec.offset + fmt.expert_bytes} but only {n} could be read")
        if rec.crc32 is not None:
            crc = 0
            for b in bufs:
                crc = zlib.crc32(b, crc)  # releases the GIL on large buffers, like the read
            if crc != rec.crc32:
                raise BadInputError(
                    f"expert file {self.path} is corrupted: layer {layer} slot {slot} (bytes {rec.offset}.."
                    f"{rec.offset + fmt.expert_bytes}) fails its crc32 check; `moeopt verify "
                    f"{self.path.parent}` checks the whole artifact")
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
