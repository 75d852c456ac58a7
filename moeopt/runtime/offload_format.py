"""Offload-mode artifacts: the packed expert file, its index in the manifest, and the interface between
the segment driver (`moeopt.runtime.offload`) and whatever supplies expert weights (`ExpertSource`).

An offload artifact (``lower{experts=offload}``) keeps non-expert weights and each layer's hot experts
in its graphs and every other ("cold") expert in one packed file, ``experts.bin``. The file is a
sequence of page-aligned records, one per cold (layer, slot). A record holds the expert's tensors in
the layout of one frame of its format's pool: the parts of its `PoolFormat`, concatenated in order,
each C-contiguous, then zero padding up to `PoolFormat.record_bytes`. Reading an expert is therefore
one ``os.preadv`` of the record straight into a free frame of the pool (no copy, no unpacking).

A *format* is one storage layout shared by every cold expert that has it (for example 4-bit, block 32,
asymmetric, QMoE; or float32, MoE): its pool is a set of arrays ``(frames, *part.shape)`` that are fed
as the weight inputs of the format's *cold graph*, a one-node model (QMoE or MoE) with inputs
``x (N, H)``, ``sw (N, frames)`` and one input per part, and output ``y (N, H)``. Column ``f`` of ``sw``
is the routing weight of the expert in frame ``f`` (0 where the frame holds nothing this layer needs),
so the node computes exactly the chosen cold experts and any frame count works, whatever mix of layers
the frames hold.

Manifest section ``"offload"`` (written by the lowering, read by `OffloadIndex.from_manifest`)::

    {"file": "experts.bin", "page": 4096, "file_bytes": int,
     "formats": {NAME: {"op": "com.microsoft.QMoE", "graph": "cold_NAME.onnx", "record_bytes": int,
                        "parts": [{"name": "fc1", "shape": [..], "dtype": "uint8"}, ...]}},
     "experts": [{"layer": 0, "slot": 3, "format": NAME, "offset": int, "crc32": int}, ...],
     "hot": [[slot, ...] per MoE layer],
     "top_k": [k per MoE layer], "num_slots": [S per MoE layer], "num_experts": [E per MoE layer],
     "segments": [...], "layers": [...], "prefetch": {...} | null}

("segments", "layers" and "prefetch" belong to the lowering and the driver; see `moeopt.lower.offload`.)

Each record's ``crc32`` (zlib's, of the record's ``expert_bytes``, padding excluded) is checked by
`moeopt.runtime.expert_store.ExpertStore` on every read of that record, so opening an artifact need not
hash the whole of ``experts.bin`` (seconds per GB, and a page cache full of experts the run may never
use): `moeopt.runtime.manifest.read_manifest` skips the file's sha256 when every record has a checksum,
and ``moeopt verify`` checks all of it on demand. CRC-32 because the threat is a damaged file (a flipped
byte, a bad sector, an interrupted copy), not an adversary - whoever can rewrite ``experts.bin`` can
rewrite the manifest's sha256 too -: it detects every error burst of up to 32 bits, so every flipped byte,
and misses random damage with probability 2^-32 per record. zlib's runs at ~4 GB/s on an idle core here
against ~1.4 GB/s for hashlib's sha256 (with SHA-NI; far slower on boards without crypto extensions),
and releases the GIL: checking a 4.5 MiB record costs ~1.1 ms, about what reading it from the page
cache costs, and a few percent of reading it from an SD card or eMMC (~50 ms at 90 MB/s). Artifacts
written before the checksums (no ``crc32``) still open: the whole file's sha256 is checked as before.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from moeopt.errors import BadInputError

PAGE = 4096
EXPERTS_FILE = "experts.bin"


def page_align(n: int, page: int = PAGE) -> int:
    """`n` rounded up to whole pages."""
    return -(-n // page) * page


@dataclass(frozen=True)
class Part:
    """One tensor of an expert as stored: its shape for ONE expert (the pool adds a leading frames axis)."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name: uint8, float32

    @property
    def nbytes(self) -> int:
        return int(math.prod(self.shape)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class PoolFormat:
    """A storage layout of cold experts, the pool arrays that hold it, and the graph that computes it."""

    name: str
    op: str  # com.microsoft.QMoE or com.microsoft.MoE
    graph: str  # the cold graph's file in the artifact
    parts: tuple[Part, ...]
    page: int = PAGE

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert's tensors (what a load reads and a frame holds)."""
        return sum(p.nbytes for p in self.parts)

    @property
    def record_bytes(self) -> int:
        """Bytes one expert takes in the file (page-aligned)."""
        return page_align(self.expert_bytes, self.page)

    def empty_pool(self, frames: int, only: Collection[str] | None = None) -> dict[str, np.ndarray]:
        """Zeroed pool arrays ``{part: (frames, *shape)}`` of every part, or of the parts named in `only`;
        a zero frame computes 0 at weight 0."""
        return {p.name: np.zeros((frames, *p.shape), dtype=p.dtype) for p in self.parts
                if only is None or p.name in only}

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "graph": self.graph, "record_bytes": self.record_bytes,
                "parts": [{"name": p.name, "shape": list(p.shape), "dtype": p.dtype} for p in self.parts]}

    @classmethod
    def from_dict(cls, name: str, d: dict[str, Any], page: int = PAGE) -> PoolFormat:
        parts = tuple(Part(str(p["name"]), tuple(int(s) for s in p["shape"]), str(p["dtype"])) for p in d["parts"])
        fmt = cls(name, str(d["op"]), str(d["graph"]), parts, page)
        if int(d.get("record_bytes", fmt.record_bytes)) != fmt.record_bytes:
            raise BadInputError(f"offload format {name}: record_bytes {d['record_bytes']} does not match its parts "
                                f"({fmt.record_bytes})")
        return fmt


@dataclass(frozen=True)
class ExpertRecord:
    """Where one cold expert lies in the packed file."""

    layer: int
    slot: int
    format: str
    offset: int  # bytes from the start of the file, a multiple of the page size
    crc32: int | None = None  # zlib.crc32 of the record's expert bytes (None: an artifact from before checksums)


@dataclass(frozen=True)
class OffloadIndex:
    """The manifest's ``offload`` section, parsed."""

    file: str
    formats: dict[str, PoolFormat]
    experts: dict[tuple[int, int], ExpertRecord]  # (layer, slot) -> record
    hot: tuple[tuple[int, ...], ...]  # per MoE layer, the slots in the resident graph
    top_k: tuple[int, ...]
    file_bytes: int
    page: int = PAGE

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> OffloadIndex:
        sec = manifest.get("offload")
        if not isinstance(sec, dict):
            raise BadInputError("not an offload artifact (its manifest has no 'offload' section); "
                                "lower with lower{experts=offload}")
        page = int(sec.get("page", PAGE))
        formats = {n: PoolFormat.from_dict(n, d, page) for n, d in sec["formats"].items()}
        experts = {}
        for e in sec["experts"]:
            crc = e.get("crc32")
            rec = ExpertRecord(int(e["layer"]), int(e["slot"]), str(e["format"]), int(e["offset"]),
                               None if crc is None else int(crc))
            if rec.format not in formats:
                raise BadInputError(
                    f"offload index: layer {rec.layer} slot {rec.slot} names unknown format {rec.format}")
            experts[(rec.layer, rec.slot)] = rec
        return cls(str(sec["file"]), formats, experts, tuple(tuple(int(s) for s in h) for h in sec["hot"]),
                   tuple(int(k) for k in sec["top_k"]), int(sec["file_bytes"]), page)

    @property
    def checksummed(self) -> bool:
        """Every record carries its crc32 (then a read checks it, and opening need not hash the file)."""
        return bool(self.experts) and all(r.crc32 is not None for r in self.experts.values())

    def cold(self, layer: int) -> list[int]:
        """The cold slots of `layer`, in slot order."""
        return sorted(s for (li, s) in self.experts if li == layer)

    def format_of(self, layer: int, slot: int) -> PoolFormat:
        return self.formats[self.experts[(layer, slot)].format]

    def cold_bytes(self) -> int:
        """Bytes of every cold expert's tensors (100% of the offloaded experts)."""
        return sum(self.formats[r.format].expert_bytes for r in self.experts.values())

    def min_frames(self) -> dict[str, int]:
        """Per format, the fewest frames that can run every layer: one step of one layer may need up to
        top_k of its cold experts of that format at once."""
        need: dict[str, int] = {n: 0 for n in self.formats}
        for layer, k in enumerate(self.top_k):
            per: dict[str, int] = {}
            for s in self.cold(layer):
                f = self.experts[(layer, s)].format
                per[f] = per.get(f, 0) + 1
            for f, n in per.items():
                need[f] = max(need[f], min(k, n))
        return need

    def min_budget(self) -> int:
        """The smallest cache budget in bytes (`min_frames` of every format)."""
        return sum(n * self.formats[f].expert_bytes for f, n in self.min_frames().items())


class ExpertSource(Protocol):
    """What the segment driver needs from an expert cache (an all-resident pool, or `ExpertCache`).

    The driver, for each MoE layer with cold experts chosen by some token: splits the chosen cold slots
    by format and into chunks of at most ``frames(fmt)`` slots, calls ``acquire`` on a chunk (which
    blocks until those experts are in frames and pins them), computes them and calls ``release``. A
    `packed` source computes each acquired expert with ``expert(fmt, frame)``, its prepacked session
    (`moeopt.runtime.packed_frames`); otherwise the driver runs the format's cold graph on
    ``arrays(fmt)`` with the routing weights moved to the returned frames.
    """

    index: OffloadIndex
    packed: bool
    hint_width: int | None  # use only the first n experts of each token's prefetch hint (None: all)

    def frames(self, fmt: str) -> int:
        """Frames in the pool of format `fmt`."""
        ...

    def arrays(self, fmt: str) -> dict[str, np.ndarray]:
        """The pool of `fmt`: ``{part: (frames, *shape)}``, fed as the cold graph's weight inputs."""
        ...

    def expert(self, fmt: str, frame: int) -> Any:
        """The `PackedExpert` in an acquired frame (packed sources only)."""
        ...

    def acquire(self, layer: int, slots: Sequence[int]) -> dict[int, int]:
        """Make the cold experts ``(layer, s)`` resident (loading what is missing, blocking until done),
        pin them until `release`, and return ``{slot: frame}``. At most ``frames(fmt)`` slots per format."""
        ...

    def release(self) -> None:
        """Unpin everything `acquire` pinned."""
        ...

    def hint(self, layer: int, slots: Sequence[int]) -> None:
        """A prefetch request: the experts ``(layer, s)`` will probably be needed soon (may be ignored)."""
        ...

    def routed(self, layer: int, slots: Sequence[int]) -> None:
        """Every cold expert the router chose for `layer`, before the driver acquires them (in chunks):
        hints of the layer that name others were wrong, and their reads may be cancelled."""
        ...

    def keep_mask(self, layer: int) -> np.ndarray | None:
        """A router mask (E,) bool to run `layer` with (SwapMoE's committee), or None for the model's;
        asked for just before the segment with the layer's router runs, after the layers before it ran."""
        ...

    def observe(self, layer: int, logits: np.ndarray) -> None:
        """The layer's router logits (N, E) of the step just run (for policies that track importance)."""
        ...


def frames_for_budget(index: OffloadIndex, budget: int) -> dict[str, int]:
    """Split a byte budget into frames per format: every format first gets `OffloadIndex.min_frames`,
    then the rest of the budget is shared in proportion to the bytes of each format's remaining cold
    experts, so the frames never hold more than `budget` bytes and a budget of every cold expert's bytes
    holds every cold expert.

    Raises:
        BadInputError: the budget is below `OffloadIndex.min_budget` (the message names that minimum).
    """
    need = index.min_frames()
    minimum = index.min_budget()
    if budget < minimum:
        raise BadInputError(f"expert cache budget {budget} bytes is below one layer's largest expert set; "
                            f"the minimum that works is {minimum} bytes ({minimum / 2**20:.2f} MiB)")
    count = {n: 0 for n in index.formats}
    for r in index.experts.values():
        count[r.format] += 1
    rest = index.cold_bytes() - minimum  # bytes of the experts beyond the minimum frames
    spare = min(budget, index.cold_bytes()) - minimum
    # Integer arithmetic: format n gets spare * its share of `rest`, i.e. spare * (count - need) / rest frames.
    return {n: need[n] + (spare * (count[n] - need[n]) // rest if rest else 0) for n in index.formats}
