"""The cold experts of an offload artifact: `experts.bin`, its formats and their one-node cold graphs.

Every cold (layer, slot) is stored in exactly the per-expert layout its resident node would hold
(`onnx_quant._ort_table` + `qmoe_group` for QMoE groups, the interleaved float layout for MoE), so the
cold graph computes bit for bit what the resident layer computes. The file layout, the index and the
pool/frame contract are in `moeopt.runtime.offload_format`.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from moeopt.lower.offload_graph import cold_groups
from moeopt.lower.onnx_experts import MOE_MLP_ACTS, swiglu_attrs
from moeopt.lower.onnx_quant import QMOE_MLP_ACTS, Group, QuantSettings, _ort_table, qmoe_biases
from moeopt.quant.ort_layout import glu_interleave, qmoe_group
from moeopt.runtime.offload_format import EXPERTS_FILE, PAGE, Part, PoolFormat

_DTYPES = {"uint8": TensorProto.UINT8, "float32": TensorProto.FLOAT}


@dataclass(frozen=True)
class ColdFormat:
    """A pool format plus what its cold graph's node needs."""

    pool: PoolFormat
    attrs: tuple[tuple[str, Any], ...]  # node attributes except k
    k: int  # the largest top-k of the layers that use it (the runtime clamps it to its frames)


def _np(t: torch.Tensor | np.ndarray) -> np.ndarray:
    a = t.detach().float().numpy() if isinstance(t, torch.Tensor) and t.is_floating_point() else np.asarray(t)
    return np.ascontiguousarray(a)


def _qmoe_parts(layer: Any, g: Group) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Stacked per-slot arrays {part: (Sg, ...)} of a QMoE group, and the node's attributes."""
    t, spec = layer.table, layer.table.spec
    view = _ort_table(t, g)
    packed = qmoe_group(view, list(g.slots))
    bias_in, bias_out = qmoe_biases(t, g, view.spec)  # as the resident node's
    parts: dict[str, np.ndarray] = {"fc1": packed.fc1, "fc1_scales": packed.fc1_scales}
    if packed.fc1_zero_points is not None:
        parts["fc1_zero_points"] = packed.fc1_zero_points
    if bias_in is not None:
        parts["fc1_bias"] = _np(bias_in)
    parts["fc2"], parts["fc2_scales"] = packed.fc2, packed.fc2_scales
    if packed.fc2_zero_points is not None:
        parts["fc2_zero_points"] = packed.fc2_zero_points
    if bias_out is not None:
        parts["fc2_bias"] = _np(bias_out)
    attrs = {**packed.attributes(spec.glu), "activation_type": "swiglu" if spec.glu else QMOE_MLP_ACTS[spec.act],
             **swiglu_attrs(spec)}
    return {k: np.ascontiguousarray(v) for k, v in parts.items()}, attrs


def _moe_parts(layer: Any, g: Group) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The float slots as `com.microsoft.MoE` reads them: fc1 (Sg, F, H) gate/up interleaved, fc2 (Sg, H, I),
    and their biases where the experts have them."""
    t, spec = layer.table, layer.table.spec
    idx = list(g.slots)
    w_in = t.w_in[idx].float()
    rows = glu_interleave(spec.intermediate) if spec.glu else torch.arange(spec.in_rows)
    act = "swiglu" if spec.glu else MOE_MLP_ACTS[spec.act]
    parts = {"fc1": _np(w_in[:, rows])}
    if t.b_in is not None:
        parts["fc1_bias"] = _np(t.b_in[idx].float()[:, rows])
    parts["fc2"] = _np(t.w_out[idx].float())
    if t.b_out is not None:
        parts["fc2_bias"] = _np(t.b_out[idx].float())
    return parts, {"activation_type": act, "swiglu_fusion": 1 if spec.glu else 0, **swiglu_attrs(spec)}


def _format_name(op: str, attrs: dict[str, Any], taken: set[str]) -> str:
    base = "moe-f32" if op.endswith(".MoE") else (
        f"qmoe-{attrs['expert_weight_bits']}bit-b{attrs['block_size']}")
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    return name


@dataclass(frozen=True)
class ColdGroup:
    """One storage group of a layer's cold slots, as its records are written: per-slot arrays and the
    format key (op, node attributes, parts) that names its pool format."""

    op: str
    attrs: tuple[tuple[str, Any], ...]
    parts: tuple[Part, ...]
    k: int  # the layer's router top-k
    slots: tuple[int, ...]
    arrays: dict[str, np.ndarray]  # part -> (len(slots), ...)

    @property
    def record_bytes(self) -> int:
        return PoolFormat("", self.op, "", self.parts, PAGE).record_bytes

    def records(self) -> Iterator[tuple[int, bytes, int]]:
        """(slot, the record's bytes without padding, crc32) per slot, in slot order, one at a time."""
        for i, slot in enumerate(self.slots):
            data = b"".join(a[i].tobytes() for a in self.arrays.values())
            yield int(slot), data, zlib.crc32(data)


def cold_records(layer: Any, hot: Sequence[int], quant: QuantSettings) -> list[ColdGroup]:
    """The cold groups of one layer with their arrays (what `write_experts` writes for it, in order)."""
    out = []
    for g in cold_groups(layer, hot):
        op = g.op
        arrays, attrs = _qmoe_parts(layer, g) if op == "com.microsoft.QMoE" else _moe_parts(layer, g)
        if op == "com.microsoft.QMoE":
            attrs["accuracy_level"] = quant.accuracy_level
        parts = tuple(Part(n, tuple(int(d) for d in a.shape[1:]), str(a.dtype)) for n, a in arrays.items())
        out.append(ColdGroup(op, tuple(sorted(attrs.items())), parts, int(layer.router.top_k), tuple(g.slots),
                             arrays))
    return out


def register_format(formats: dict[str, ColdFormat], keys: dict[tuple[Any, ...], str], op: str,
                    attrs: tuple[tuple[str, Any], ...], parts: tuple[Part, ...], k: int) -> str:
    """The pool format name of a group's key, registering it (or widening its k) in `formats`."""
    key = (op, attrs, parts)
    if key not in keys:
        keys[key] = _format_name(op, dict(attrs), set(formats))
    name = keys[key]
    fmt = formats.get(name)
    if fmt is None or fmt.k < k:
        pool = PoolFormat(name, op, f"cold_{name}.onnx", parts, PAGE)
        formats[name] = ColdFormat(pool, attrs, max(k, fmt.k if fmt else 0))
    return name


def write_experts(model: Any, hot: dict[int, tuple[int, ...]], folder: Path,
                  quant: QuantSettings) -> tuple[dict[str, ColdFormat], list[dict[str, Any]], int]:
    """Write every cold expert to `folder/experts.bin` (page-aligned records, in (layer, slot) order), each
    entry with the crc32 of its record's bytes (checked by the runtime on every read of the record).

    Returns:
        (formats by name, the index's expert entries, file bytes).
    """
    formats: dict[str, ColdFormat] = {}
    keys: dict[tuple[Any, ...], str] = {}
    entries: list[dict[str, Any]] = []
    offset = 0
    with (folder / EXPERTS_FILE).open("wb") as f:
        for layer in model.layers:
            for g in cold_records(layer, hot[layer.index], quant):
                name = register_format(formats, keys, g.op, g.attrs, g.parts, g.k)
                record = formats[name].pool.record_bytes
                for slot, data, crc in g.records():
                    f.seek(offset)
                    f.write(data)
                    entries.append({"layer": int(layer.index), "slot": slot, "format": name, "offset": offset,
                                    "crc32": crc})
                    offset += record
        f.truncate(offset)  # the last record's padding too: every record is whole pages
    for fmt in formats.values():
        write_cold_graph(fmt, folder / fmt.pool.graph)
    return formats, entries, offset


def write_cold_graph(fmt: ColdFormat, path: Path, k: int | None = None) -> None:
    """The format's cold graph: x (N, H), sw (N, frames), one input per part -> y (N, H)."""
    onnx.save(cold_graph(fmt.pool, dict(fmt.attrs), fmt.k if k is None else k), str(path))


def cold_graph(pool: PoolFormat, attrs: dict[str, Any], k: int) -> onnx.ModelProto:
    """The one-node (QMoE, or MoE with its routing trick) model of a pool format, `k` experts per token."""
    parts = {p.name: p for p in pool.parts}
    hidden = parts["fc2"].shape[0]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["tokens", hidden]),
              helper.make_tensor_value_info("sw", TensorProto.FLOAT, ["tokens", "frames"])]
    inputs += [helper.make_tensor_value_info(p.name, _DTYPES[p.dtype], ["frames", *p.shape]) for p in pool.parts]
    nodes = []

    def has(name: str) -> str:
        return name if name in parts else ""

    if pool.op == "com.microsoft.QMoE":
        ins = ["x", "sw", "fc1", "fc1_scales", has("fc1_bias"), "fc2", "fc2_scales", has("fc2_bias"), "", "", "",
               has("fc1_zero_points"), has("fc2_zero_points"), "", "sw"]
        nodes.append(helper.make_node("QMoE", ins, ["y"], domain="com.microsoft", k=k, normalize_routing_weights=0,
                                      **{"activation_alpha": 1.0, "activation_beta": 0.0, **attrs}))
    else:  # MoE applies a softmax: feed log(sw) and scale back by sum(sw) (see onnx_experts.weighted_router)
        moe_ins = ["x", "logits", "fc1", has("fc1_bias"), "fc2"] + (["fc2_bias"] if "fc2_bias" in parts else [])
        nodes += [
            helper.make_node("Constant", [], ["floor"], value_float=1e-30),
            helper.make_node("Max", ["sw", "floor"], ["sw_floor"]),
            helper.make_node("Log", ["sw_floor"], ["logits"]),
            helper.make_node("Constant", [], ["axis"], value_ints=[-1]),
            helper.make_node("ReduceSum", ["sw", "axis"], ["scale"], keepdims=1),
            helper.make_node("MoE", moe_ins, ["y_unscaled"], domain="com.microsoft", k=k, normalize_routing_weights=0,
                             **attrs),
            helper.make_node("Mul", ["y_unscaled", "scale"], ["y"]),
        ]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["tokens", hidden])
    graph = helper.make_graph(nodes, f"cold_{pool.name}", inputs, [out])
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10, producer_name="moeopt")


def offload_section(formats: dict[str, ColdFormat], entries: Sequence[dict[str, Any]], file_bytes: int,
                    model: Any, hot: dict[int, tuple[int, ...]]) -> dict[str, Any]:
    """The manifest's "offload" section as `OffloadIndex.from_manifest` reads it (segments etc. added later)."""
    fmts = {}
    for name, fmt in formats.items():
        d = fmt.pool.to_dict()
        d["k"] = fmt.k  # additive: the k the cold graph file was written with
        fmts[name] = d
    return {
        "file": EXPERTS_FILE, "page": PAGE, "file_bytes": int(file_bytes), "formats": fmts, "experts": list(entries),
        "hot": [sorted(int(s) for s in hot[layer.index]) for layer in model.layers],
        "top_k": [int(layer.router.top_k) for layer in model.layers],
        "num_slots": [int(layer.table.num_slots) for layer in model.layers],
        "num_experts": [int(layer.router.num_experts) for layer in model.layers],
    }
