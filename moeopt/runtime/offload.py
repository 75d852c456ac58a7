"""`OffloadSession`: run an offload artifact - the segment driver - and `AllResident`, the simplest expert source.

An offload artifact (``lower{experts=offload}``, see `moeopt.lower.offload`) is segments seg0..segL with
each MoE layer's cold experts computed between segment i and i + 1. Per step the driver runs seg0, then
for each layer i: takes the cold slots some token chose (nonzero in ``moe{i}.sw``), groups them by
format, splits them into chunks of at most the source's frames, acquires each chunk (the source loads
what is missing: that wait is the stall), runs the format's cold graph on the pool with the routing
weights moved to the acquired frames, adds the chunk outputs (fixed order), releases, feeds the sum as
``moe{i}.cold`` and runs segment i + 1. Pool arrays go to ORT as OrtValues that wrap their memory, so a
load into a frame is seen by the next run without a copy. After each segment, the prefetch hints it
computed (the manifest's ``prefetch`` outputs: seg0's predictions of every later layer, look-ahead
refinements one layer ahead, far heads two layers ahead - into the next step for its first two layers -,
the early head's guess of the next step's layer 0 from the segment that ends at the last router, and
the next step's layer 0 from the last segment) go to ``source.hint``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moeopt.errors import BadInputError
from moeopt.runtime.expert_store import ExpertStore
from moeopt.runtime.manifest import read_manifest
from moeopt.runtime.offload_format import ExpertSource, OffloadIndex
from moeopt.runtime.packed_frames import FramePacker, PackedExpert, frame_pool, frame_views
from moeopt.runtime.session import Session, session_options

SourceFactory = Callable[[OffloadIndex, Path], ExpertSource]


class AllResident:
    """Every cold expert read once into pools with one frame per expert (an `ExpertSource` that never evicts).

    The reference source: offload output with it must equal the resident artifact's. With `packed`
    (default) every expert also gets its prepacked session (`packed_frames`), as `ExpertCache` builds them.
    """

    hint_width: int | None = None  # it takes no hints

    def __init__(self, index: OffloadIndex, artifact: str | Path, *, packed: bool = True,
                 threads: int | None = None) -> None:
        self.index = index
        counts: dict[str, int] = {n: 0 for n in index.formats}
        self._frame: dict[tuple[int, int], int] = {}
        for key in sorted(index.experts):
            rec = index.experts[key]
            self._frame[key] = counts[rec.format]
            counts[rec.format] += 1
        self.packer = (FramePacker(index, artifact, read_manifest(artifact, verify=False).get("target"), threads)
                       if packed else None)
        self.packed = packed
        self._counts = counts
        self._pools = {n: frame_pool(fmt, counts[n], self.packer) for n, fmt in index.formats.items()}
        self._experts: dict[tuple[str, int], PackedExpert] = {}
        with ExpertStore(artifact, index) as store:  # checks the file against the index first
            for (layer, slot), f in self._frame.items():
                fmt = index.formats[index.experts[(layer, slot)].format]
                views = frame_views(fmt, self._pools[fmt.name], f, self.packer)
                store.read_into(layer, slot, views)
                if self.packer is not None:
                    self._experts[(fmt.name, f)] = self.packer.build(fmt.name, views)

    def expert(self, fmt: str, frame: int) -> PackedExpert:
        return self._experts[(fmt, frame)]

    def frames(self, fmt: str) -> int:
        return self._counts[fmt]

    def arrays(self, fmt: str) -> dict[str, np.ndarray]:
        return self._pools[fmt]

    def acquire(self, layer: int, slots: Sequence[int]) -> dict[int, int]:
        return {s: self._frame[(layer, s)] for s in slots}

    def release(self) -> None:
        pass

    def hint(self, layer: int, slots: Sequence[int]) -> None:
        pass

    def routed(self, layer: int, slots: Sequence[int]) -> None:
        pass

    def keep_mask(self, layer: int) -> np.ndarray | None:
        return None

    def observe(self, layer: int, logits: np.ndarray) -> None:
        pass


@dataclass
class OffloadTiming:
    """Where the time of the steps so far went (seconds), and how much cold work there was."""

    steps: int = 0
    segments_s: float = 0.0  # running segment graphs
    cold_s: float = 0.0  # running cold graphs
    stall_s: float = 0.0  # inside source.acquire (waiting for loads)
    cold_runs: int = 0  # cold-graph runs (chunks)
    cold_experts: int = 0  # (layer, slot) acquisitions

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]


class OffloadSession(Session):
    """An offload artifact opened with ONNX Runtime: the same surface as `Session` (generate, logits, step ...).

    Args:
        artifact: the folder ``lower{experts=offload}`` wrote.
        source: where cold experts come from: an `ExpertSource`, or a factory (index, artifact path) -> one;
            default `AllResident`.
        verify: check every file's sha256 against the manifest first.
        threads: override the profile's intra-op thread count.
        max_chunk: at most this many cold experts per cold-graph run (tests; default: the source's frames).
        token_hints: when the artifact has a token table (the manifest's ``prefetch.token``), hint the first
            MoE layer's experts of the token each decode step feeds, before its first segment runs. The
            last segment's ``next0`` hint of the step before names those of the argmax token, which is the
            token fed only under greedy decoding; with sampling this hint corrects it.
        early_hints: act on the early head's output (the manifest's ``prefetch.early``) when the artifact
            has one (False: to compare serving with and without it on one artifact).
    """

    drives_segments = True

    def __init__(self, artifact: str | Path, *, source: ExpertSource | SourceFactory | None = None,
                 verify: bool = True, threads: int | None = None, max_chunk: int | None = None,
                 token_hints: bool = True, early_hints: bool = True) -> None:
        super().__init__(artifact, verify=verify, threads=threads)
        if self.manifest.get("offload") is None:
            raise BadInputError(f"{self.path}: not an offload artifact; open it with Session")
        sec = self.manifest["offload"]
        target = self.manifest.get("target", {})
        self.index = OffloadIndex.from_manifest(self.manifest)
        self.layer_names: list[dict[str, str]] = list(sec["layers"])
        layers = self.manifest["layers"]
        self.default_masks = [np.asarray(la["keep_mask"], dtype=bool) for la in layers]
        self.slot_of = [np.asarray(la["slot_of"], dtype=np.int64) for la in layers]
        self.prefetch: dict[str, Any] | None = sec.get("prefetch")
        if source is None:
            source = AllResident(self.index, self.path)  # `threads` is the segments'; experts: `FramePacker.threads_of`
        elif isinstance(source, type) or not hasattr(source, "acquire"):  # a factory (a class is one too)
            source = source(self.index, self.path)  # type: ignore[operator]
        self.source: ExpertSource = source  # type: ignore[assignment]
        self.max_chunk = max_chunk
        self.packed = bool(getattr(source, "packed", False))  # cold experts as prepacked sessions, or cold graphs
        if self.packed:  # segment threads spinning after each run would take the cores from the experts' runs
            target = {**target, "config": {**target.get("config", {}), "session.intra_op.allow_spinning": "0"}}
        self.segments = [(self._open(s["file"], target, threads), list(s["inputs"]), list(s["outputs"]))
                         for s in sec["segments"]]
        self._hint_at = self._hint_plan(early_hints)
        self._token_table = self._read_token_table() if token_hints else None
        self.cold_sessions = {} if self.packed else {
            n: self._open_cold(n, sec["formats"][n], target, threads) for n in self.index.formats}
        self._cold = [self.index.cold(i) for i in range(len(self.layer_names))]
        self._hot = [set(h) for h in self.index.hot]
        self._pool_values: dict[str, tuple[dict[str, np.ndarray], dict[str, Any]]] = {}
        self.timing = OffloadTiming()
        self._batch = 1  # sequences in the running step (`_last`)

    def _open(self, name: str | None, target: dict[str, Any], threads: int | None) -> Any:
        return None if name is None else super()._open(name, target, threads)

    def _open_cold(self, name: str, meta: dict[str, Any], target: dict[str, Any], threads: int | None) -> Any:
        """The format's cold graph with k clamped to the source's frames (QMoE/MoE need k <= experts)."""
        import onnx
        import onnxruntime as ort

        frames = self.source.frames(name)
        model = onnx.load(str(self.path / meta["graph"]))
        for node in model.graph.node:
            for a in node.attribute:
                if a.name == "k" and node.domain == "com.microsoft" and frames and a.i > frames:
                    a.i = frames
        return ort.InferenceSession(model.SerializeToString(), session_options(target, threads),
                                    providers=target.get("providers", ["CPUExecutionProvider"]))

    def _pool(self, fmt: str) -> dict[str, Any]:
        """OrtValues over the source's pool arrays (made once; remade if the source swaps its arrays)."""
        import onnxruntime as ort

        arrays = self.source.arrays(fmt)
        cached = self._pool_values.get(fmt)
        if cached is None or any(cached[0].get(k) is not v for k, v in arrays.items()):
            values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()}
            cached = (dict(arrays), values)
            self._pool_values[fmt] = cached
        return cached[1]

    def _run(self, feeds: dict[str, np.ndarray], past: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        n = len(feeds)
        vals: dict[str, Any] = {k: v if v.dtype == np.float32 else v.astype(np.int64) for k, v in feeds.items()}
        vals.update(zip(self.input_names[n:], past, strict=True))
        self._batch = next(iter(feeds.values())).shape[0]  # feeds are (B, T): ids, mask, positions
        ids = vals.get("input_ids")
        if self._token_table is not None and ids is not None and ids.shape[-1] == 1:  # a decode step
            fed = ids[:, -1]
            fed = fed[(fed >= 0) & (fed < len(self._token_table))]  # a bad id is the segment's error to report
            self._hint_experts(0, self._token_table[fed])
        self._mask(0, vals)
        self._segment(0, vals)
        self._hints(0, vals)
        for i, names in enumerate(self.layer_names):
            vals[names["cold"]] = self._cold_experts(i, vals[names["x"]], vals[names["sw"]])
            self.source.observe(i, vals[names["logits"]])
            if i + 1 < len(self.layer_names):
                self._mask(i + 1, vals)
            self._segment(i + 1, vals)
            self._hints(i + 1, vals)
        self.timing.steps += 1
        return vals[self.output_names[0]], [vals[k] for k in self.output_names[1:]]

    def _mask(self, layer: int, vals: dict[str, Any]) -> None:
        """The router mask of `layer`, asked for just before the segment with its router runs (segment k
        holds layer k's): a committee source may read experts to fill one layer's mask, evicting those of
        a layer that has already run, never those a mask handed out earlier in the step allowed (asked
        for every layer at the start of a step, the routing of layer 0 could go to an expert that layer
        1's mask had since evicted)."""
        mask = self.source.keep_mask(layer)
        names = self.layer_names[layer]
        vals[names["keep_mask"]] = self.default_masks[layer] if mask is None else np.asarray(mask, dtype=bool)

    def _segment(self, k: int, vals: dict[str, Any]) -> None:
        sess, inputs, outputs = self.segments[k]
        t0 = time.perf_counter()
        vals.update(zip(outputs, sess.run(outputs, {name: vals[name] for name in inputs}), strict=True))
        self.timing.segments_s += time.perf_counter() - t0

    def _hint_plan(self, early: bool = True) -> list[list[tuple[int, str, bool]]]:
        """Per segment, the (layer, output name, last position only) prefetch hints it computes, in the
        order to give them: the predictor's outputs (all in seg0), the look-ahead ones (layer j's from
        segment j-1), the far heads (layer j's from segment j-2, the next step's first two layers from
        the last two segments with a router, last position), the early head (the next step's layer 0
        from the segment that ends at the last router, last position) and the next step's layer 0 from
        the last segment (its last position's token), which supersedes the early head's."""
        plan: list[list[tuple[int, str, bool]]] = [[] for _ in self.segments]
        if not self.prefetch:
            return plan
        named = [(j, n, False) for j, n in [*self.prefetch["outputs"].items(),
                                             *(self.prefetch.get("ahead") or {}).items(),
                                             *(self.prefetch.get("far") or {}).items()]]
        named += [(j, n, True) for j, n in [*(self.prefetch.get("next") or {}).items(),
                                            *(self.prefetch.get("next_far") or {}).items(),
                                            *((self.prefetch.get("early") or {}) if early else {}).items()]]
        for j, name, last in named:
            k = next((k for k, (_, _, outs) in enumerate(self.segments) if name in outs), None)
            if k is None:
                raise BadInputError(f"{self.path}: prefetch output '{name}' is not an output of any segment")
            plan[k].append((int(j), name, last))
        return plan

    def _hints(self, k: int, vals: dict[str, Any]) -> None:
        """Predicted experts that segment `k` computed -> cold slots -> source.hint (a later hint of a
        layer supersedes an earlier one)."""
        for layer, name, last in self._hint_at[k]:
            self._hint_experts(layer, self._last(vals[name]) if last else vals[name])

    def _last(self, ids: np.ndarray) -> np.ndarray:
        """The last position's rows of a hint output: (B, T, m) -> (B, m); an output computed on the
        flattened (B*T, H) token rows of a layer's input (far and early heads), (B*T, m) -> (B, m)."""
        if ids.ndim >= 3:
            return ids[:, -1]
        return ids.reshape(self._batch, -1, ids.shape[-1])[:, -1]

    def _hint_experts(self, layer: int, ids: np.ndarray) -> None:
        """(..., m) expert ids, best first -> the cold slots among the first hint_width -> source.hint,
        in rank order: every token's first choice, then every token's second, ... (the cache reads a
        layer's hints in the order given, so the likelier expert is not kept waiting behind a second
        guess)."""
        if self.source.hint_width is not None:
            ids = ids[..., : self.source.hint_width]
        by_rank = ids.reshape(-1, ids.shape[-1]).T.reshape(-1)
        slots = self.slot_of[layer][by_rank]
        hot = self._hot[layer]
        cold = list(dict.fromkeys(int(s) for s in slots if s >= 0 and int(s) not in hot))
        self.source.hint(layer, cold)  # also when empty: it withdraws an earlier hint of the layer

    def _read_token_table(self) -> np.ndarray | None:
        """The manifest's token table, (vocab, m) expert ids of the first MoE layer; None if it has none."""
        name = ((self.prefetch or {}).get("token") or {}).get("0")
        if name is None:
            return None
        path = self.path / name
        try:
            table = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise BadInputError(f"{path}: unreadable token table ({e})") from None
        vocab = int(self.manifest["vocab_size"])
        if table.ndim != 2 or table.shape[0] != vocab or table.shape[1] < 1:
            raise BadInputError(f"{path}: a token table of shape {table.shape}, expected ({vocab}, k)")
        if table.min() < 0 or table.max() >= len(self.slot_of[0]):
            raise BadInputError(f"{path}: expert ids outside 0..{len(self.slot_of[0]) - 1}")
        return table.astype(np.int64)

    def _cold_experts(self, layer: int, x: np.ndarray, sw: np.ndarray) -> np.ndarray:
        """(N, H) tokens, (N, S) slot weights -> (N, H): the chosen cold experts of `layer`, weighted, summed."""
        y = np.zeros_like(x)  # (N, H)
        cold = self._cold[layer]
        if not cold:
            return y
        chosen = (sw[:, cold] != 0).any(axis=0)  # (C,)
        by_fmt: dict[str, list[int]] = {}
        for s, used in zip(cold, chosen, strict=True):
            if used:
                by_fmt.setdefault(self.index.experts[(layer, s)].format, []).append(s)
        self.source.routed(layer, [s for slots in by_fmt.values() for s in slots])
        for fmt in sorted(by_fmt):
            slots = by_fmt[fmt]
            frames = self.source.frames(fmt)
            step = min(frames, self.max_chunk) if self.max_chunk else frames
            for start in range(0, len(slots), step):
                y += self._chunk(layer, fmt, slots[start:start + step], x, sw, frames)
        return y

    def _chunk(self, layer: int, fmt: str, slots: list[int], x: np.ndarray, sw: np.ndarray, frames: int) -> np.ndarray:
        t0 = time.perf_counter()
        where = self.source.acquire(layer, slots)
        t1 = time.perf_counter()
        try:
            if self.packed:
                out = self._packed(fmt, slots, where, x, sw)
            else:
                out = self._graph(fmt, slots, where, x, sw, frames)
        finally:
            self.source.release()
        t2 = time.perf_counter()
        self.timing.stall_s += t1 - t0
        self.timing.cold_s += t2 - t1
        self.timing.cold_runs += 1
        self.timing.cold_experts += len(slots)
        return out


    def _graph(self, fmt: str, slots: list[int], where: dict[int, int], x: np.ndarray, sw: np.ndarray,
               frames: int) -> np.ndarray:
        """One run of the format's cold graph over the whole pool, routing weights moved to the frames."""
        sw_cold = np.zeros((sw.shape[0], frames), dtype=np.float32)  # (N, frames)
        for s in slots:
            sw_cold[:, where[s]] = sw[:, s]
        out: np.ndarray = self.cold_sessions[fmt].run(["y"], {"x": x, "sw": sw_cold, **self._pool(fmt)})[0]
        return out

    def _packed(self, fmt: str, slots: list[int], where: dict[int, int], x: np.ndarray,
                sw: np.ndarray) -> np.ndarray:
        """Each expert's prepacked session on the tokens that chose it, weighted, summed in slot order."""
        y = np.zeros_like(x)
        for s in slots:
            rows = np.flatnonzero(sw[:, s])
            expert = self.source.expert(fmt, where[s])
            if len(rows) == x.shape[0]:
                y += expert.run(x, sw[:, s:s + 1])
            else:
                y[rows] += expert.run(x[rows], sw[rows, s:s + 1])
        return y

    def close(self) -> None:
        """Stop the expert source's I/O threads and close its file (a cache holds both)."""
        close = getattr(self.source, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> OffloadSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_artifact(path: str | Path, **kw: Any) -> Session:
    """`OffloadSession` for an offload artifact, `Session` otherwise (keywords go to the class).

    `source` and `max_chunk` only apply to offload artifacts.
    """
    manifest = read_manifest(path, verify=False)
    if manifest.get("offload") is not None:
        return OffloadSession(path, **kw)
    kw.pop("source", None)
    kw.pop("max_chunk", None)
    return Session(path, **kw)
