"""Cold experts run as prepacked one-expert ONNX Runtime sessions: the fast way to compute a loaded frame.

Fed as graph inputs (the cold graph of `offload_format`), QMoE cannot prepack its weights and
dequantizes every chosen expert on every call: about 13 ms per 4-bit expert of a 1B Mixtral layer
(H=1024, I=2816) on 2 x86 threads, ten times the prepacked kernel (~1.3 ms, ONNX-NOTES.md). ORT exposes
no API to prepack a tensor once and feed it later, so each loaded frame gets its own tiny session: the
format's cold graph with one expert (k=1) whose weights are initializers handed over with
``SessionOptions.add_initializer`` (no copy). Building it is part of a load (about 2 ms per MB of
expert, on the thread that read the expert, so a prefetch hides it too), so the build is kept lean: the
graph's placeholders are one-element tensors (the real ones replace them before ORT reads a shape), the
OrtValues over a frame's memory are made once per frame and reused by every expert it holds, and each
session of a small expert runs on one intra-op thread by default (from `BIG_EXPERT` bytes up, one per
core). Measured on the reference model's 140 KB 4-bit experts (2 x86 cores, `bench/expert_load.py`): a
build plus the release of the frame's previous session went from 1.03 ms to 0.74 ms, and a one-token run
from 0.175 ms to 0.139 ms; a session with a thread pool pays for starting and joining its thread, and
one expert's decode work is too small to split (a 32-token prefill of one expert is about 25% slower on
one thread, a one-off).

Which tensors the kernel prepacks - copies into its own buffers at session start - and which it reads
at run time is ORT's business (1.32: QMoE copies ``fc1``/``fc2`` and reads scales and zero points).
`FramePacker` measures it once per format (`probe`): a part whose later change does not change the
output is *copied*. Copied parts need no frame memory: they are read into a per-thread staging buffer,
packed, and the buffer is reused, so a frame costs the kept parts plus ORT's packed copy, about one
record. Sessions run without spinning threads (hundreds of idle sessions must not burn the cores) and
without ORT's memory arena, and glibc is told to mmap every allocation of 1 MiB or more
(`return_freed_memory`): evicting an expert then gives its packed weights back to the OS at once. Without
that, glibc's heap kept the freed weights, and RSS grew with every eviction (measured on the ~1B model:
11 MB per live expert after 112 loads through 20 frames, against 5.6 MB with it; a record is 4.7 MB).
"""

from __future__ import annotations

import ctypes
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moeopt.errors import BadInputError
from moeopt.runtime.offload_format import OffloadIndex, PoolFormat


def return_freed_memory() -> bool:
    """glibc only: serve allocations of 1 MiB or more by mmap, so freeing one returns it to the OS.

    glibc raises its mmap threshold after each large free and serves later large blocks from the heap,
    which does not shrink; a cache that builds and drops packed experts all the time then holds far
    more than its frames. Process-wide; returns whether it applied (False off glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3  # <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, 1 << 20))
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        return False


def trim_heap() -> bool:
    """glibc only: give the heap's free memory back to the OS (malloc_trim(0)). After a phase that freed
    gigabytes (an export, an ONNX Runtime session), glibc keeps those pages for later allocations, and a
    next phase of another shape adds its own on top; trimming between them keeps the peak that of the
    larger phase, not their sum. Returns whether it applied (False off glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):  # musl or another libc
        return False


BIG_EXPERT = 16 << 20  # from this many bytes an expert session gets a thread per core (`FramePacker.threads_of`)
PROBE_TOKENS = (1, 2, 64)  # token counts `probe` runs: decode, a few, a prefill's share of one expert


@dataclass
class PackedExpert:
    """One loaded expert: its session, and the OrtValues over frame memory it still reads at run time."""

    session: Any
    values: list[Any]

    def run(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        """(N, H) tokens, (N, 1) routing weights -> (N, H) weighted expert output."""
        out: np.ndarray = self.session.run(["y"], {"x": x, "sw": w})[0]
        return out


class FramePacker:
    """Builds `PackedExpert`s for the formats of an offload artifact.

    Args:
        index: the artifact's offload index.
        folder: the artifact folder (holds each format's cold graph).
        target: the manifest's target profile (providers).
        threads: intra-op threads of each expert session (default: 1 below `BIG_EXPERT` bytes, see the
            module's docstring; one per core above).
    """

    def __init__(self, index: OffloadIndex, folder: str | Path, target: dict[str, Any] | None = None,
                 threads: int | None = None) -> None:
        return_freed_memory()
        self.index = index
        self.target = dict(target or {})
        self.threads = None if threads is None else int(threads)
        self._proto = {n: self._one_expert_graph(fmt, Path(folder) / fmt.graph) for n, fmt in index.formats.items()}
        self._values: dict[tuple[int, tuple[int, ...], str], Any] = {}  # OrtValues over frame memory, by address
        self._values_lock = threading.Lock()
        self._local = threading.local()
        self.copied = {n: self.probe(n) for n in index.formats}

    @staticmethod
    def _one_expert_graph(fmt: PoolFormat, path: Path) -> bytes:
        """The cold graph with k=1 and each part as a (1, *shape) initializer placeholder."""
        import onnx
        from onnx import numpy_helper

        if not path.is_file():
            raise BadInputError(f"cold graph {path} of offload format {fmt.name} is missing")
        model = onnx.load(str(path))
        names = {p.name for p in fmt.parts}
        for node in model.graph.node:
            for a in node.attribute:
                if a.name == "k" and node.domain == "com.microsoft":
                    a.i = 1
        kept = [i for i in model.graph.input if i.name not in names]
        del model.graph.input[:]
        model.graph.input.extend(kept)
        for p in fmt.parts:  # replaced by add_initializer; a one-element placeholder keeps the graph valid
            # (a full-size one would be parsed on every build: 140 KB per reference expert)
            model.graph.initializer.append(numpy_helper.from_array(np.zeros((1,) * (1 + len(p.shape)), p.dtype),
                                                                   p.name))
        return bytes(model.SerializeToString())

    def threads_of(self, fmt: str) -> int:
        """Intra-op threads of an expert session of `fmt`: the packer's, else 1 for small experts and ORT's
        default (one per core) from `BIG_EXPERT` bytes up, where one expert's decode work is worth splitting
        (an 8x7B-shaped expert, 100 MB at 4 bits: 22 ms per token on one thread, 12 ms on two)."""
        if self.threads is not None:
            return self.threads
        return 1 if self.index.formats[fmt].expert_bytes < BIG_EXPERT else 0

    def _options(self, fmt: str) -> Any:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # one node: nothing to fuse
        so.intra_op_num_threads = self.threads_of(fmt)
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.enable_cpu_mem_arena = False  # a session's arena outlives its runs: hundreds of them add up
        return so

    def build(self, fmt: str, views: Sequence[np.ndarray]) -> PackedExpert:
        """A session for the expert whose parts are `views` (format order, one expert each)."""
        sess, values = self._session(fmt, views)
        kept = [v for p, v in zip(self.index.formats[fmt].parts, values, strict=True) if p.name not in self.copied[fmt]]
        return PackedExpert(sess, kept)

    def _session(self, fmt: str, views: Sequence[np.ndarray], reuse: bool = True) -> tuple[Any, list[Any]]:
        import onnxruntime as ort

        so = self._options(fmt)
        values = []
        for p, v in zip(self.index.formats[fmt].parts, views, strict=True):
            one = v.reshape((1, *p.shape))
            values.append(self._value(one) if reuse and one.flags.c_contiguous
                          else ort.OrtValue.ortvalue_from_numpy(one))  # wraps, no copy
            so.add_initializer(p.name, values[-1])
        sess = ort.InferenceSession(self._proto[fmt], so,
                                    providers=self.target.get("providers", ["CPUExecutionProvider"]))
        return sess, values

    def _value(self, array: np.ndarray) -> Any:
        """An OrtValue over `array`'s memory (no copy), made once per address, shape and dtype: a frame
        or staging buffer is reused by every expert loaded there. The OrtValue holds the array, so an
        address in the table stays that array's until the packer goes."""
        import onnxruntime as ort

        key = (int(array.__array_interface__["data"][0]), tuple(array.shape), array.dtype.str)
        with self._values_lock:
            value = self._values.get(key)
            if value is None:
                value = self._values[key] = ort.OrtValue.ortvalue_from_numpy(array)
            return value

    @property
    def wrapped_buffers(self) -> int:
        """How many buffers (frame parts, staging buffers) have an OrtValue made for them: bounded by the
        pools and threads, not by the number of loads."""
        return len(self._values)

    def probe(self, fmt: str) -> frozenset[str]:
        """The parts of `fmt` that ORT copies at session start (changing them later changes nothing)."""
        pf = self.index.formats[fmt]
        rng = np.random.default_rng(0)
        views = [(rng.random(p.shape, dtype=np.float32) * 0.01).astype(p.dtype) if np.dtype(p.dtype).kind == "f"
                 else rng.integers(0, 256, p.shape).astype(p.dtype) for p in pf.parts]
        sess, values = self._session(fmt, views, reuse=False)  # `values` keeps every part alive while probing
        expert = PackedExpert(sess, values)
        hidden = self.hidden(fmt)
        # Several token counts: a kernel may read its prepacked copy for a few tokens and the original
        # weights for many (a prefill), so a part counts as copied only if no count reads it at run time.
        xs = [rng.standard_normal((n, hidden), dtype=np.float32) for n in PROBE_TOKENS]
        ws = [np.ones((n, 1), dtype=np.float32) for n in PROBE_TOKENS]
        base = [expert.run(x, w) for x, w in zip(xs, ws, strict=True)]
        copied = set()
        for v, p in zip(views, pf.parts, strict=True):
            saved = v.copy()
            v[...] = 0 if np.dtype(p.dtype).kind == "f" else 7
            if all(np.array_equal(expert.run(x, w), b) for x, w, b in zip(xs, ws, base, strict=True)):
                copied.add(p.name)
            v[...] = saved
        return frozenset(copied)

    def hidden(self, fmt: str) -> int:
        """The hidden size H of format `fmt` (its graph input x is (N, H))."""
        import onnx

        model = onnx.load_from_string(self._proto[fmt])
        x = next(i for i in model.graph.input if i.name == "x")
        return int(x.type.tensor_type.shape.dim[1].dim_value)

    def staging(self, fmt: str) -> dict[str, np.ndarray]:
        """This thread's buffers for the copied parts of `fmt` (a read lands there, then is packed)."""
        bufs: dict[str, dict[str, np.ndarray]] = self._local.__dict__.setdefault("bufs", {})
        if fmt not in bufs:
            bufs[fmt] = {p.name: np.zeros(p.shape, p.dtype) for p in self.index.formats[fmt].parts
                         if p.name in self.copied[fmt]}
        return bufs[fmt]

    def pooled(self, fmt: str) -> tuple[str, ...]:
        """The parts of `fmt` a frame must keep (ORT reads them at run time)."""
        return tuple(p.name for p in self.index.formats[fmt].parts if p.name not in self.copied[fmt])


def frame_pool(fmt: PoolFormat, frames: int, packer: FramePacker | None) -> dict[str, np.ndarray]:
    """Zeroed pool arrays ``{part: (frames, *shape)}`` of `fmt`: every part, or with a packer only the
    parts its sessions read at run time (the copied ones go through the packer's staging buffers)."""
    return fmt.empty_pool(frames, packer.pooled(fmt.name) if packer is not None else None)


def frame_views(fmt: PoolFormat, pool: dict[str, np.ndarray], frame: int,
                packer: FramePacker | None) -> list[np.ndarray]:
    """Where a read of expert `frame` of `pool` lands, one array per part in format order: the frame's
    slice of each pool array, or (with a packer) this thread's staging buffer for a part ORT copies."""
    staging = packer.staging(fmt.name) if packer is not None else {}
    return [pool[p.name][frame] if p.name in pool else staging[p.name] for p in fmt.parts]
