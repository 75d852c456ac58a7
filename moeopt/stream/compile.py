"""The streamed compile: `moeopt convert CKPT --passes '...' -o OUT --stream [--work-dir DIR]`.

A checkpoint larger than memory is compiled one decoder layer at a time (see `moeopt.stream` for the
design). Sweep 1, per layer i: read its weights from the shards (`LazyCheckpoint`), run the calibration
hidden states through it with routing observers (`importance`; each expert read when the forward reaches
it), rank and drop experts (`prune`), re-read the kept experts one at a time and quantize them
(`quantize{method=uniform}`, RTN), keep the hot slots' packed matrices (`hot-i.pt`), write the cold records to
`WORK/layer-i.bin` and what the rest of the compile needs about the layer to `WORK/layer-i.json` (slots,
packed formats, record groups and crc32s), then release the layer. Its outputs are the next layer's inputs
(`WORK/hidden-i.pt`). Then the export: the graph of the non-expert weights and the hot slots, every cold
expert a weightless stand-in (`skeleton.husk`), cut into segments; experts.bin is the layer files in order.
With `quantize{non-experts=4|8}` each layer's attention linears are quantized right after its dense weights
are loaded, and lm_head (`lm-head=true`) after the top is, by the in-memory pass's RTN (`_Linears`), and
lowered as MatMulNBits; sweep 1's importance forward runs on the float weights, as the in-memory
importance pass runs before quantize. Then the parity check (`lower{verify=true}`): the artifact's greedy
tokens on the parity probe (onnxruntime), and one streamed teacher-forced PyTorch forward over prompt +
tokens (sweep 2: each expert re-read and re-quantized when reached, each layer's linears quantized again
when loaded, RTN is deterministic) gives the reference logits in parity.npz.
The same sweep carries the tolerance's simulated forward (`stream.simulate`), so the artifact is held to
the measured error model the in-memory lowering states (`moeopt.lower.tolerance`, manifest ``parity_rule``);
with verify off there is no probe, and the manifest states the fixed rule (``parity_rule.kind`` "fixed").

Resume: a layer whose json and bin are in the work folder is not recomputed; the work folder records the
source checkpoint (config, shard sizes), the per-layer pipeline and the calibration tokens' hash, and
refuses a run of another model or pipeline. Killed and restarted with the same command, the run finishes
with the same artifact bytes.
"""

from __future__ import annotations

import errno
import gc
import hashlib
import io
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moeopt.errors import BadInputError, UnsupportedModelError, VerificationError
from moeopt.ir.compute import RoutingTrace
from moeopt.ir.layer import MoELayer
from moeopt.ir.table import QuantizedMatrix, SlotInfo
from moeopt.lower import onnx_linears
from moeopt.lower.artifact import (
    _copy_tokenizer,
    build_manifest,
    contrib_ops,
    optimize_offline,
    parity_tolerance,
)
from moeopt.lower.expert_file import ColdFormat, cold_records, register_format, write_cold_graph
from moeopt.lower.offload import choose_hot, export_offload
from moeopt.lower.onnx_experts import check_lowerable
from moeopt.lower.onnx_quant import QuantSettings, check_layers, quant_settings
from moeopt.lower.parity import PROMPT_LEN
from moeopt.lower.profiles import profile
from moeopt.outdir import atomic_dir, check_out_dir, commit_dir
from moeopt.passes.base import PassContext
from moeopt.passes.calib import CalibSet
from moeopt.passes.importance import LayerStats, _merge_all, calibration_sets
from moeopt.passes.prune import ExpertClasses, classify, classify_by_thresholds
from moeopt.quant import linears
from moeopt.quant.groupwise import quantize, quantize_dequantize, searched
from moeopt.runtime.manifest import MANIFEST, PARITY_FILE, hash_files
from moeopt.runtime.offload_format import EXPERTS_FILE, Part
from moeopt.stream.merge import MergeGroup, SlotMaker, match_layer, merge_layer
from moeopt.stream.plan import StreamPlan, stream_plan
from moeopt.stream.reader import LazyCheckpoint
from moeopt.stream.simulate import Simulation, dual_layer
from moeopt.stream.skeleton import StreamSkeleton, husk, quantized_meta

WORK_FORMAT = "moeopt-stream-work"
WORK_VERSION = 1
JOB = "job.json"
FAIL_ENV = "MOEOPT_STREAM_FAIL_AFTER_LAYER"  # tests: stop the run (as a kill would) after this layer is saved


class InjectedFailure(RuntimeError):
    """The run was stopped on purpose after a layer (FAIL_ENV), to test resuming."""


@dataclass
class StreamReport:
    """What a streamed compile did: per layer seconds and bytes read (recomputed layers only), totals."""

    out: str
    pipeline: str
    layers: list[dict[str, Any]] = field(default_factory=list)
    resumed_layers: int = 0
    bytes_read: int = 0
    peak_live_layers: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    parity_measured: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


Log = Callable[[str], None]


def stream_compile(
    src: str | Path, pipeline: str, out: str | Path, *, work_dir: str | Path | None = None,
    overwrite: bool = False, data_root: Path | None = None, log: Log | None = None,
    hooks: list[Callable[[frozenset[int]], None]] | None = None,
) -> StreamReport:
    """Compile checkpoint `src` with `pipeline` into the offload artifact `out`, one decoder layer at a time.

    Args:
        work_dir: keeps per-layer results, so that a killed run restarted with the same command resumes;
            None: a temporary folder beside `out`, removed at the end.
        hooks: called with the set of decoder layers whose experts are materialised, after each change.

    Raises:
        BadInputError: the checkpoint (missing or truncated shard), the pipeline (a pass that cannot stream)
            or the work folder (another model's or pipeline's) is refused before anything is written to `out`.
        VerificationError: the artifact misses the streamed PyTorch reference by more than its tolerance.
    """
    say = log or (lambda _m: None)
    t_start = time.perf_counter()
    src, out = Path(src), Path(out)
    plan = stream_plan(pipeline, out)
    check_out_dir(out, overwrite=overwrite)
    reader = LazyCheckpoint(src)
    reader.hooks.extend(hooks or [])
    sk = StreamSkeleton(src, reader)
    model = sk.model
    ctx = PassContext(data_root=data_root)
    for p in (plan.prune, plan.quantize):
        if p is not None:
            p.requires(model, ctx)
    sets: list[CalibSet] = []
    if plan.importance is not None:
        o = plan.importance.opts
        sets = calibration_sets(model, tuple(o["calib"]), o["seq-len"], o["max-tokens"], data_root)
    report = StreamReport(str(out), plan.text)
    temp_work = work_dir is None
    work = Path(work_dir) if work_dir is not None else out.parent / f".{out.name}.work-{uuid.uuid4().hex[:8]}"
    _open_work(work, _fingerprint(src, reader, plan, sets))
    quant = QuantSettings(int(plan.lower.opts["accuracy-level"]), exact=False)
    try:
        states = _sweep(sk, plan, sets, work, quant, report, say)
        report.seconds["layers"] = round(time.perf_counter() - t_start, 2)
        _lower(sk, plan, states, work, out, quant, overwrite, report, say)
    except OSError as e:
        # A disk that fills (ENOSPC), a quota (EDQUOT) or a file-size limit (EFBIG): the same one line.
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        keep = "" if temp_work else f"; {work} keeps the finished layers, the same command resumes"
        raise BadInputError(f"could not write {e.filename or work}: {e.strerror}: nothing was written to "
                            f"{out}{keep}") from e
    finally:
        if temp_work:
            shutil.rmtree(work, ignore_errors=True)
    report.bytes_read = reader.bytes_read
    report.peak_live_layers = reader.peak_live
    report.seconds["total"] = round(time.perf_counter() - t_start, 2)
    return report


# -- the work folder ----------------------------------------------------------------------------------


def _save_torch(obj: Any, path: Path) -> None:
    """torch.save through a temporary file renamed into place. Serialised in memory first and written by
    Python: torch's own file writer reports a failed write (a full disk) as a RuntimeError with no errno,
    which the caller could not tell from a bug; Python's write raises OSError(ENOSPC)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    _replace(path, buf.getbuffer())


def _replace(path: Path, data: bytes | memoryview) -> None:
    """Write `data` to a temporary sibling and rename it onto `path`: a killed run leaves the old file or
    none, never half of one (what resuming relies on)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _fingerprint(src: Path, reader: LazyCheckpoint, plan: StreamPlan, sets: list[CalibSet]) -> dict[str, Any]:
    h = hashlib.sha256()
    for cs in sets:
        h.update(cs.name.encode())
        for b in cs.batches:
            h.update(b.numpy().tobytes())
    shards = sorted({(t.shard.name, t.shard.stat().st_size) for t in reader.tensors.values()})
    return {
        "format": WORK_FORMAT, "version": WORK_VERSION, "source": str(src.resolve()),
        "config_sha256": hashlib.sha256((src / "config.json").read_bytes()).hexdigest(),
        "shards": [list(s) for s in shards], "pipeline": plan.layer_text(), "calibration_sha256": h.hexdigest(),
    }


def _open_work(work: Path, job: dict[str, Any]) -> None:
    """Create the work folder, or accept an existing one made by the same job; refuse any other."""
    if work.exists() and not work.is_dir():
        raise BadInputError(f"--work-dir {work}: exists and is not a folder")
    if work.exists() and any(work.iterdir()):
        try:
            have = json.loads((work / JOB).read_text())
        except (OSError, ValueError):
            raise BadInputError(f"--work-dir {work}: not empty and not a streamed compile's work folder (no "
                                f"{JOB}); give an empty or new folder") from None
        if not isinstance(have, dict) or have.get("format") != WORK_FORMAT:
            raise BadInputError(f"--work-dir {work}: not a streamed compile's work folder; give an empty or new one")
        for key, what in (("version", "work folder version"), ("source", "source checkpoint"),
                          ("config_sha256", "checkpoint config"), ("shards", "checkpoint shards"),
                          ("pipeline", "pipeline"), ("calibration_sha256", "calibration data")):
            if have.get(key) != job[key]:
                raise BadInputError(f"--work-dir {work}: made by another job (its {what} differs: "
                                    f"{str(have.get(key))[:60]!r} vs {str(job[key])[:60]!r}); give a new folder")
        return
    work.mkdir(parents=True, exist_ok=True)
    _write_json(work / JOB, job)


def _write_json(path: Path, data: Any) -> None:
    _replace(path, json.dumps(data, indent=1).encode())


def _layer_files(work: Path, i: int) -> tuple[Path, Path, Path]:
    return work / f"layer-{i:05d}.json", work / f"layer-{i:05d}.bin", work / f"hidden-{i:05d}.pt"


def _hot_file(work: Path, i: int) -> Path:
    return work / f"hot-{i:05d}.pt"


def _done(work: Path, i: int) -> dict[str, Any] | None:
    """Layer i's saved state if its files are whole, else None (the layer is computed again)."""
    meta, data, _ = _layer_files(work, i)
    try:
        state: dict[str, Any] = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    if not data.exists() or data.stat().st_size != state["bytes"]:
        return None
    if state["hot"] and not _hot_file(work, i).exists():
        return None
    return state


# -- sweep 1: layer by layer ------------------------------------------------------------------------------


def _sweep(sk: StreamSkeleton, plan: StreamPlan, sets: list[CalibSet], work: Path, quant: QuantSettings,
           report: StreamReport, say: Log) -> list[dict[str, Any]]:
    n = len(sk.model.layers)
    need_hidden = plan.importance is not None
    states: list[dict[str, Any]] = []
    first = 0
    while first < n and (st := _done(work, first)) is not None:
        states.append(st)
        first += 1
    if need_hidden and 0 < first < n and not _layer_files(work, first - 1)[2].exists():
        states, first = [], 0  # the inputs of the first missing layer are gone (a kill during the export)
    for st in states:  # done layers: weightless stand-ins, as the export needs them
        sk.drop_experts(st["layer"], [SlotInfo.from_dict(d) for d in st["slots"]], st["quantized"])
    report.resumed_layers = first
    if first:
        say(f"stream: layers 0..{first - 1} resumed from {work}")
    hidden: list[list[torch.Tensor]] = []
    if need_hidden:
        if first == 0:
            sk.load_top(embed=True, head=False)
            hidden = [[sk.embed(b) for b in cs.batches] for cs in sets]
            sk.drop_top()
        elif first < n:
            hidden = torch.load(_layer_files(work, first - 1)[2], weights_only=True)
    fail_after = os.environ.get(FAIL_ENV)
    for i in range(first, n):
        t0, c0, b0 = time.perf_counter(), time.process_time(), sk.reader.bytes_read
        state, hidden = _layer(sk, i, plan, sets, hidden, work, quant)
        state["seconds"] = round(time.perf_counter() - t0, 2)
        state["cpu_seconds"] = round(time.process_time() - c0, 2)  # all threads: flat where wall time is not
        state["bytes_read"] = sk.reader.bytes_read - b0
        meta, _, hid = _layer_files(work, i)
        if need_hidden and i + 1 < n:
            _save_torch(hidden, hid)
        _write_json(meta, state)  # last: the layer counts as done once this exists
        if i > 0:
            _layer_files(work, i - 1)[2].unlink(missing_ok=True)
        states.append(state)
        report.layers.append({"layer": i, "seconds": state["seconds"], "cpu_seconds": state["cpu_seconds"],
                              "bytes_read": state["bytes_read"]})
        say(f"stream: layer {i + 1}/{n} in {state['seconds']:.1f} s, {state['bytes_read'] / 2**30:.2f} GiB read")
        if fail_after is not None and i == int(fail_after):
            raise InjectedFailure(f"stopped after layer {i} ({FAIL_ENV}={fail_after})")
    return states


def _layer(sk: StreamSkeleton, i: int, plan: StreamPlan, sets: list[CalibSet], hidden: list[list[torch.Tensor]],
           work: Path, quant: QuantSettings) -> tuple[dict[str, Any], list[list[torch.Tensor]]]:
    """Layer i through the per-layer passes; its cold records written; the next layer's inputs returned."""
    moe: MoELayer = sk.model.layers[i]
    t = moe.table
    e_count = t.num_experts
    sk.load_dense(i)
    slots = [SlotInfo((e,)) for e in range(e_count)]
    stats: dict[str, Any] = {}
    combined: LayerStats | None = None
    if plan.importance is not None:
        sk.lazy_experts(i, slots)
        per_set: list[LayerStats] = []
        outs: list[list[torch.Tensor]] = []
        for hs in hidden:
            st = LayerStats(e_count)

            def observe(_layer: MoELayer, trace: RoutingTrace, st: LayerStats = st) -> None:
                st.add(trace)

            moe.observers.append(observe)
            try:
                outs.append([sk.forward_layer(i, h) for h in hs])
            finally:
                moe.observers.remove(observe)
            per_set.append(st)
        hidden = outs
        combined = _merge_all(per_set)
        freq = combined.freq
        slots = [SlotInfo(s.members, importance=float(sum(freq[e] for e in s.members))) for s in t.slots]
        t.set_slots(torch.empty((e_count, 0)), torch.empty((e_count, 0)), slots)  # release the weights
        sk.reader.release(i)
        stats["tokens"] = combined.tokens
    groups: dict[int, MergeGroup] = {}
    if plan.prune is not None:
        cls = _prune(plan, moe, slots, combined)
        n, cold = len(slots), set(cls.cold)
        slots = [info for info in slots if info.members[0] not in cold]
        stats["experts-removed"] = n - len(slots)
        if plan.match is not None:
            sk.reader.acquire(i)  # similarity=weight/output reads the layer's experts
            pairs = match_layer(sk, i, plan, cls, combined)
            stats["pairs"] = len(pairs)
            if plan.merge is not None and pairs:
                slots, groups = merge_layer(plan, slots, pairs, combined)
                stats["experts-merged"] = len(pairs)
    make = SlotMaker(sk, i, slots, groups, _align(plan))
    bits = _bits(plan)
    if bits is not None:  # expert by expert: the layer's float table is never held
        sk.drop_experts(i, slots, {}, release=False)
        sk.reader.acquire(i)
        _quantize_each(sk, i, bits, plan, make)
    else:
        sk.load_experts(i, slots, make)
    hot = choose_hot(_OneLayer(moe), plan.hot())[i]  # type: ignore[arg-type]
    records = []
    data = _layer_files(work, i)[1]
    tmp = data.with_name(data.name + ".tmp")
    size = 0
    with tmp.open("wb") as f:
        for g in cold_records(moe, hot, quant):
            rb, crcs = g.record_bytes, []
            for _slot, blob, crc in g.records():
                f.write(blob)
                f.write(b"\0" * (rb - len(blob)))
                size += rb
                crcs.append(crc)
            records.append({"op": g.op, "attrs": [list(a) for a in g.attrs], "k": g.k, "slots": list(g.slots),
                           "parts": [[p.name, list(p.shape), p.dtype] for p in g.parts], "crcs": crcs})
            del g
    os.replace(tmp, data)
    if hot:  # the graph holds these: their packed matrices are kept for the export
        packed = {key: [q.packed, q.scales, q.zero_points] for key, q in t.quantized.items()
                  if int(key.split("_", 1)[0]) in hot}
        path = _hot_file(work, i)
        _save_torch(packed, path)
    qmeta = quantized_meta(moe)
    state: dict[str, Any] = {"layer": i, "slots": [s.to_dict() for s in t.slots], "quantized": qmeta,
             "hot": list(hot), "groups": records, "bytes": size, "stats": stats, "merges": make.state()}
    sk.drop_experts(i, list(t.slots), qmeta)
    sk.drop_dense(i)
    return state, hidden


class _OneLayer:
    """A model with one layer, as `choose_hot` reads it."""

    plan = None

    def __init__(self, layer: MoELayer) -> None:
        self.layers = [layer]


def _prune(plan: StreamPlan, moe: MoELayer, slots: list[SlotInfo], stats: LayerStats | None) -> ExpertClasses:
    """One layer's hot / moderate / cold experts, as `prune` classifies them (`prune.rank_experts` +
    `classify`)."""
    assert plan.prune is not None
    o = plan.prune.opts
    method = "importance" if o["method"] == "frequency" else o["method"]
    score = "freq" if o["method"] == "frequency" else o["score"]
    owners = [s.members[0] for s in slots]
    if method == "random":
        g = torch.Generator().manual_seed(o["seed"] * 100_003 + moe.index)
        ranked = [owners[i] for i in torch.randperm(len(owners), generator=g).tolist()]
    else:
        assert stats is not None
        values = stats.freq if score == "freq" else stats.prob
        ranked = sorted(owners, key=lambda e: (-float(values[e]), e))
    top_k = moe.router.top_k
    if o["alpha"] >= 0:
        assert stats is not None
        cls = classify_by_thresholds(ranked, stats.freq, top_k, o["alpha"], o["beta"])
    else:
        cold_share = 1.0 - o["keep"] if o["cold"] < 0 else o["cold"]
        cls = classify(ranked, moe.table.num_experts, top_k, o["keep"], cold_share)
    return cls


def _bits(plan: StreamPlan) -> int | None:
    from moeopt.passes.quantize import parse_bits

    return None if plan.quantize is None else parse_bits(str(plan.quantize.opts["bits"]))


def _searched(plan: StreamPlan, bits: int) -> bool:
    """Whether the in-memory pass searches the scales at `bits` (`scales=auto`: at 2 and 3 bits with RTN)."""
    from moeopt.passes.quantize import scale_search

    assert plan.quantize is not None
    return searched(scale_search(plan.quantize.opts), bits)


def _align(plan: StreamPlan) -> str:
    return "none" if plan.merge is None else str(plan.merge.opts["align"])


def _quantize_each(sk: StreamSkeleton, i: int, bits: int, plan: StreamPlan, make: SlotMaker) -> None:
    """Uniform RTN quantization of layer i's slots, as `quantize{method=uniform}` (`quantize_slot`) does it,
    each slot made (read, or merged: `SlotMaker`), quantized and dropped in turn (the layer's float table
    is never held)."""
    assert plan.quantize is not None
    o = plan.quantize.opts
    group, sym, search = int(o["group"]), bool(o["symmetric"]), _searched(plan, bits)
    t = sk.model.layers[i].table
    for s in range(len(t.slots)):
        w_in, w_out = make(s)
        for name, w in (("w_in", w_in), ("w_out", w_out)):
            q, _ = quantize_dequantize(w, bits, group, sym, search)
            t.quantized[f"{s}_{name}"] = QuantizedMatrix(q.rows, q.cols, bits, group, sym, q.packed, q.scales,
                                                         q.zero_points)
            del q
        t.with_slot_info(s, bits=bits)
        del w_in, w_out


def _dequantized(make: SlotMaker, bits: int, plan: StreamPlan) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """Slot s of layer i as the quantized model holds it: the dequantized RTN values `quantize_slot`
    writes back (the reference numerics), made one slot at a time."""
    assert plan.quantize is not None
    group, sym = int(plan.quantize.opts["group"]), bool(plan.quantize.opts["symmetric"])
    search = _searched(plan, bits)

    def dequantized(s: int) -> tuple[torch.Tensor, torch.Tensor]:
        w_in, w_out = make(s)
        return (quantize_dequantize(w_in, bits, group, sym, search)[1],
                quantize_dequantize(w_out, bits, group, sym, search)[1])

    return dequantized


@dataclass(frozen=True)
class _Linears:
    """The non-expert linears that `quantize{non-experts=4|8[,lm-head=true]}` quantizes
    (`quant.linears.targets`), by where the streamed compile loads their weights: decoder layer i's with
    `load_dense(i)`, lm_head with `load_top`. Each is quantized right after its weights are loaded, by the
    in-memory pass's own code (`quant.linears.quantize_linears`, RTN, the pass's scale search), so its packed
    form and the dequantized values its nn.Linear then holds are the in-memory pass's; `drop_dense` /
    `drop_top` leave weightless stand-ins of the packed forms. RTN is deterministic, so the export and the
    parity sweep each quantize again from the checkpoint's weights (nothing is kept in the work folder)."""

    bits: int | None
    group: int = 0
    symmetric: bool = False
    search: frozenset[int] = frozenset()
    layers: tuple[tuple[str, ...], ...] = ()
    top: tuple[str, ...] = ()

    @staticmethod
    def of(sk: StreamSkeleton, plan: StreamPlan) -> _Linears:
        """Which linears `plan` quantizes, at which width (bits None: none, they stay float)."""
        from moeopt.passes.quantize import scale_search

        q = plan.quantize
        mode = None if q is None else linears.parse_mode(q.opts["non-experts"])
        if q is None or mode is None:
            return _Linears(None)
        if not isinstance(mode, int):  # stream_plan refuses non-experts=auto
            raise BadInputError(f"--stream: quantize{{non-experts={mode}}} cannot stream")
        paths = linears.targets(sk.model, bool(q.opts["lm-head"]))
        n = len(sk.decoders)
        by_layer: list[list[str]] = [[] for _ in range(n)]
        top: list[str] = []
        head = sk.model.hf.lm_head
        for path in paths:
            mod = sk.model.hf.get_submodule(path)
            at = next((i for i in range(n) if path.startswith(f"model.layers.{i}.")), None)
            if at is not None and any(mod is m for m, _, _ in sk.dense_names(at)):
                by_layer[at].append(path)
            elif mod is head:
                top.append(path)
            else:
                raise UnsupportedModelError(f"{sk.path}: linear '{path}' is neither a decoder layer's dense weight "
                                            "nor lm_head; the streamed compile does not load it")
        return _Linears(mode, int(q.opts["group"]), bool(q.opts["symmetric"]), scale_search(q.opts),
                        tuple(tuple(p) for p in by_layer), tuple(top))

    def stand_ins(self, sk: StreamSkeleton) -> None:
        """Each linear's packed form as a weightless stand-in of its format (`husk`), no weight read: what
        the parity check's tolerance (`Simulation`: int8 sites) reads about the linears before its sweep
        quantizes them (`bench/scale_verify.py` builds it from a fresh skeleton). A packed row's widths
        depend on the columns alone, so one zero row quantized gives them."""
        if self.bits is None:
            return
        for path in (*(p for paths in self.layers for p in paths), *self.top):
            rows, cols = linears.linear(sk.model, path).weight.shape
            one = quantize(torch.zeros(1, int(cols)), self.bits, self.group, self.symmetric)
            parts = [None if b is None else husk((int(rows), int(b.shape[1])), b.dtype)
                     for b in (one.packed, one.scales, one.zero_points)]
            assert parts[0] is not None and parts[1] is not None
            sk.model.linears[path] = QuantizedMatrix(int(rows), int(cols), self.bits, self.group, self.symmetric,
                                                     parts[0], parts[1], parts[2])

    def dense(self, sk: StreamSkeleton, i: int) -> None:
        """Quantize decoder layer i's linears (its dense weights just loaded)."""
        if self.bits is not None:
            self._quantize(sk, self.layers[i])

    def head(self, sk: StreamSkeleton) -> None:
        """Quantize lm_head (`lm-head=true`; the top's head just loaded)."""
        if self.bits is not None:
            self._quantize(sk, self.top)

    def _quantize(self, sk: StreamSkeleton, paths: tuple[str, ...]) -> None:
        linears.quantize_linears(sk.model, dict.fromkeys(paths, self.bits), self.group, self.symmetric,
                                 search=self.search)


def linear_stand_ins(sk: StreamSkeleton, plan: StreamPlan) -> None:
    """The formats of the non-expert linears `plan` quantizes, in `sk.model.linears`, no weight read (see
    `_Linears.stand_ins`); for a parity check run on its own (`bench/scale_verify.py`)."""
    _Linears.of(sk, plan).stand_ins(sk)


# -- the lowering -------------------------------------------------------------------------------------


def _expert_writer(states: list[dict[str, Any]], work: Path) -> Any:
    """experts.bin from the layer files in order, formats named as `write_experts` names them.

    Each layer file is deleted once appended, so the disk holds the layer files or experts.bin, not both
    (a checkpoint larger than RAM has an expert file to match); a run killed from here on recomputes the
    layers whose files are gone (their json stays, `_done` checks the file).
    """

    def write(folder: Path, hot: dict[int, tuple[int, ...]]) -> tuple[dict[str, ColdFormat], list[dict[str, Any]], int]:
        formats: dict[str, ColdFormat] = {}
        keys: dict[tuple[Any, ...], str] = {}
        entries: list[dict[str, Any]] = []
        offset = 0
        with (folder / EXPERTS_FILE).open("wb") as f:
            for st in states:
                i = st["layer"]
                if tuple(st["hot"]) != tuple(hot[i]):
                    raise RuntimeError(f"layer {i}: hot slots {hot[i]} differ from the records' {st['hot']}")
                for g in st["groups"]:
                    attrs = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in g["attrs"])
                    parts = tuple(Part(n, tuple(s), d) for n, s, d in g["parts"])
                    name = register_format(formats, keys, g["op"], attrs, parts, g["k"])
                    record = formats[name].pool.record_bytes
                    for slot, crc in zip(g["slots"], g["crcs"], strict=True):
                        entries.append({"layer": i, "slot": slot, "format": name, "offset": offset, "crc32": crc})
                        offset += record
                data = _layer_files(work, i)[1]
                with data.open("rb") as src:
                    shutil.copyfileobj(src, f, 16 << 20)
                data.unlink()
            if f.tell() != offset:
                raise RuntimeError(f"experts.bin: {f.tell()} bytes written, the records need {offset}")
        for fmt in formats.values():
            write_cold_graph(fmt, folder / fmt.pool.graph)
        return formats, entries, offset

    return write


def _release() -> None:
    """Collect, then return the freed heap to the OS (`trim_heap`): the export's and the ORT run's
    gigabytes would otherwise stay in the process under the next phase's (measured on the 8x7B-shaped
    checkpoint: 11.8 GiB peak in the parity check, the layer sweep 5.7)."""
    from moeopt.runtime.packed_frames import trim_heap

    torch._dynamo.reset()  # the export's traced frames, guards and graphs may hold the weights they saw
    gc.collect()
    trim_heap()


def _lower(sk: StreamSkeleton, plan: StreamPlan, states: list[dict[str, Any]], work: Path, out: Path,
           quant: QuantSettings, overwrite: bool, report: StreamReport, say: Log) -> None:
    model = sk.model
    lo = plan.lower.opts
    prof = profile(lo["target"], lo["threads"])
    check_lowerable(model.layers)
    check_layers(model.layers)
    tmp = atomic_dir(out, overwrite=overwrite)
    try:
        t0 = time.perf_counter()
        lin = _Linears.of(sk, plan)
        for i in range(len(model.layers)):
            sk.load_dense(i)
            lin.dense(sk, i)
        for st in states:  # hot slots: their packed matrices, which the graph holds
            if st["hot"]:
                t = model.layers[st["layer"]].table
                for key, (packed, scales, zp) in torch.load(_hot_file(work, st["layer"]), weights_only=True).items():
                    old = t.quantized[key]
                    assert isinstance(old, QuantizedMatrix)
                    t.quantized[key] = QuantizedMatrix(old.rows, old.cols, old.bits, old.group_size, old.symmetric,
                                                       packed, scales, zp)
        sk.load_top()
        lin.head(sk)
        onnx_linears.check_linears(model)
        with quant_settings(quant), onnx_linears.matches() as matched:
            info, offload = export_offload(model, tmp, hot=plan.hot(), quant=quant, kv_cache=True, prefetch=False,
                                           experts=_expert_writer(states, work))
        onnx_linears.check_matched(model, matched)
        for i in range(len(model.layers)):
            sk.drop_dense(i)
        sk.drop_top()
        _release()
        report.seconds["export"] = round(time.perf_counter() - t0, 2)
        say(f"stream: graph and experts.bin written in {report.seconds['export']:.1f} s")
        graphs = [s["file"] for s in offload["segments"]]
        if lo["opt-level"] == "extended":
            for name in graphs:
                optimize_offline(tmp / name, prof)
        tokenizer = _copy_tokenizer(model, tmp)
        manifest = build_manifest(model, info, prof, tokenizer=tokenizer, pipeline=plan.text,
                                  ort_optimize=lo["opt-level"] == "extended", quant=quant)
        manifest["graph"]["ops"] = contrib_ops(*(tmp / g for g in graphs))
        manifest["graph"]["file"] = None
        manifest["offload"] = offload
        manifest["streamed"] = True
        if any(len(layer.table.quantized) for layer in model.layers) or model.linears:
            manifest["quant"] = {"accuracy_level": quant.accuracy_level}
        if model.linears:
            manifest["quant"]["linears"] = {path: q.meta() for path, q in model.linears.items()}
        # without the probe (verify=false) the fixed rule; with it, the measured error model as the in-memory
        # lowering states it (`moeopt.lower.tolerance`), simulated in the parity sweep (`stream.simulate`)
        tolerance = parity_tolerance(model, quant)
        manifest["parity_tolerance"], manifest["parity_rule"] = tolerance, {"kind": "fixed"}
        manifest["parity_measured"], manifest["verified"] = None, False
        manifest["parity"] = None
        from moeopt.lower.genai import write_genai_files

        manifest["genai"] = write_genai_files(tmp, manifest, model.config)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if lo["verify"]:
            t0 = time.perf_counter()
            sim = Simulation(model, quant)
            measured, simulated = _parity(sk, states, plan, tmp, offload["file_bytes"], say, sim, lin)
            tolerance, manifest["parity_rule"] = sim.rule(simulated)
            manifest["parity_tolerance"] = tolerance
            report.seconds["verify"] = round(time.perf_counter() - t0, 2)
            report.parity_measured = measured
            if not measured <= tolerance:
                raise VerificationError(
                    f"{out}: the streamed artifact differs from the streamed PyTorch forward by {measured:.3g} "
                    f"(max |logit diff| on the parity probe), over its tolerance {tolerance:g}; nothing was "
                    "written (lower{verify=false} keeps it anyway)")
            manifest["parity"] = PARITY_FILE
            manifest["parity_measured"], manifest["verified"] = measured, True
        manifest["files"] = hash_files(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        commit_dir(tmp, out, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _parity(sk: StreamSkeleton, states: list[dict[str, Any]], plan: StreamPlan, folder: Path, expert_bytes: int,
            say: Log, sim: Simulation, lin: _Linears | None = None) -> tuple[float, float]:
    """The artifact's greedy tokens and logits on the parity probe, then PyTorch's logits on prompt + those
    tokens from one streamed teacher-forced forward; parity.npz holds prompt, tokens, PyTorch's logits.
    The same sweep carries a second hidden state with the kernels' numerics simulated (`sim`,
    `stream.simulate.dual_layer`), so the tolerance's error model reads no weight twice. The non-expert
    linears are quantized as each layer's weights are loaded (`lin`; None: as `plan` says), as the
    export quantized them.

    Returns:
        (max |logit diff| of the artifact, max |logit diff| of the simulated forward), both against
        PyTorch's logits.
    """
    from moeopt.stream.probe_run import run_in_child

    # ONNX Runtime's half in a child process: what it allocates leaves with it (`probe_run`)
    prompt, tokens, ort_logits = run_in_child(folder, int(sk.model.config.vocab_size), expert_bytes)
    seq = torch.from_numpy(np.concatenate([prompt, tokens[:, :-1]], axis=1))
    lin = _Linears.of(sk, plan) if lin is None else lin
    sk.load_top(embed=True, head=False)
    h = sk.embed(seq)
    sk.drop_top()
    h_sim = h.clone()
    bits, align = _bits(plan), _align(plan)
    for st in states:
        i = st["layer"]
        sk.load_dense(i)
        lin.dense(sk, i)
        slots = [SlotInfo.from_dict(d) for d in st["slots"]]
        make = SlotMaker.from_state(sk, i, slots, st.get("merges", []), align)
        sk.lazy_experts(i, slots, make if bits is None else _dequantized(make, bits, plan))
        h, h_sim = dual_layer(sk, i, h, h_sim, sim)
        sk.drop_experts(i, slots, st["quantized"])
        sk.drop_dense(i)
        say(f"stream: parity forward, layer {i + 1}/{len(states)}")
    sk.load_top(embed=False, head=True)
    lin.head(sk)
    ref = sk.head(h)[:, PROMPT_LEN - 1:].float().numpy()  # (1, S, V)
    with sim.linears(sk.model):
        simulated = sk.head(h_sim)[:, PROMPT_LEN - 1:].float().numpy()
    sk.drop_top()
    np.savez(folder / PARITY_FILE, prompt=prompt, tokens=tokens, logits=ref)
    return float(np.abs(ort_logits - ref).max()), float(np.abs(simulated - ref).max())
