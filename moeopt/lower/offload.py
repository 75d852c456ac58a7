"""Offload mode of `lower` (``lower{experts=offload}``): hot experts in the graphs, cold ones in experts.bin.

The decoder is exported as in resident mode, except that each MoE layer keeps only its hot slots
(`offload_graph`); the graph is then cut into segments (`segments`) that the runtime runs in sequence,
computing layer i's cold experts between segment i and i + 1 from the packed expert file
(`expert_file`). The manifest's ``offload`` section is what `moeopt.runtime.offload_format.OffloadIndex`
reads, plus ``segments`` (file, inputs, outputs), ``layers`` (value names per MoE layer) and
``prefetch`` (hint outputs of the routing predictor, or null).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir

from moeopt.errors import BadInputError, UnsupportedModelError
from moeopt.ir.model import MoEModel
from moeopt.lower.expert_file import ColdFormat, offload_section, write_experts
from moeopt.lower.export import ExportedDecoder, export_decoder
from moeopt.lower.offload_graph import check_offloadable, expose_markers, offload_layers, value_names
from moeopt.lower.onnx_quant import QuantSettings
from moeopt.lower.prefetch import (
    add_early_output,
    add_far_outputs,
    add_lookahead_outputs,
    add_next_output,
    add_prefetch_outputs,
    prefetch_meta,
    write_token_table,
)
from moeopt.lower.segments import partition

FULL = "full.onnx"  # the whole offload graph, before it is cut (removed from the artifact)
# (folder, hot slots per layer) -> (formats, expert entries, file bytes), as `write_experts` returns them
ExpertWriter = Callable[[Path, dict[int, tuple[int, ...]]], tuple[dict[str, ColdFormat], list[dict[str, Any]], int]]


def choose_hot(model: MoEModel, hot: int | None) -> dict[int, tuple[int, ...]]:
    """Hot slots per MoE layer: the plan's (model.plan["hot"]) when there is one, else the `hot` most
    important slots (`SlotInfo.importance` descending where every slot has one, slot order otherwise).

    `hot` None means every slot.
    """
    plan = getattr(model, "plan", None)
    if isinstance(plan, dict) and "hot" in plan:
        rows = plan["hot"]
        if len(rows) != len(model.layers):
            raise BadInputError(f"plan: 'hot' has {len(rows)} layers, the model {len(model.layers)}")
        out = {}
        for layer, row in zip(model.layers, rows, strict=True):
            slots = tuple(sorted({int(s) for s in row}))
            if any(not 0 <= s < layer.table.num_slots for s in slots):
                raise BadInputError(f"plan: layer {layer.index} names hot slots {list(slots)} outside "
                                    f"0..{layer.table.num_slots - 1}")
            out[layer.index] = slots
        return out
    out = {}
    for layer in model.layers:
        infos = layer.table.slots
        n = len(infos) if hot is None else min(int(hot), len(infos))
        order = list(range(len(infos)))
        if all(s.importance is not None for s in infos):
            order.sort(key=lambda s: -float(infos[s].importance or 0.0))  # stable: ties keep slot order
        out[layer.index] = tuple(sorted(order[:n]))
    return out


def export_offload(
    model: MoEModel, folder: Path, *, hot: int | None, quant: QuantSettings, kv_cache: bool, prefetch: bool | None,
    prefetch_top: int | None = None, experts: ExpertWriter | None = None,
) -> tuple[ExportedDecoder, dict[str, Any]]:
    """Write the segments, the cold graphs and experts.bin into `folder`; returns (export info, offload section).

    `experts(folder, hot)` writes experts.bin and the cold graphs instead of `write_experts` (the streamed
    compile assembles them from per-layer files: `moeopt.stream`).

    Raises:
        UnsupportedModelError: encoder-decoder models; cold slots that lower to MatMulNBits or plain ops.
    """
    if getattr(model.config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{model.architecture}: offload mode supports decoder-only models")
    if [layer.index for layer in model.layers] != list(range(len(model.layers))):
        raise UnsupportedModelError("offload mode needs MoE layers indexed 0..L-1")
    hot_slots = choose_hot(model, hot)
    check_offloadable(model.layers, hot_slots)
    with offload_layers(hot_slots):
        info = export_decoder(model, folder / FULL, kv_cache=kv_cache)
    ir_model = ir.load(folder / FULL)
    seen = expose_markers(ir_model.graph)
    if seen != list(range(len(model.layers))):
        raise UnsupportedModelError(
            f"offload export: MoE layers {seen} were lowered, expected 0..{len(model.layers) - 1}")
    hints = _add_prefetch(model, ir_model.graph, prefetch, prefetch_top)
    if hints is not None and hints["next"] and model.predictor is not None:
        hints["token"] = write_token_table(model.predictor, folder, top=hints["top"])
    segs = partition(ir_model, len(model.layers), folder)
    del ir_model
    for name in (FULL, FULL + ".data"):
        (folder / name).unlink(missing_ok=True)
    if experts is None:
        formats, entries, nbytes = write_experts(model, hot_slots, folder, quant)
    else:
        formats, entries, nbytes = experts(folder, hot_slots)
    section = offload_section(formats, entries, nbytes, model, hot_slots)
    section["segments"] = [s.to_dict() for s in segs]
    section["layers"] = [value_names(i) for i in range(len(model.layers))]
    section["prefetch"] = hints
    return info, section


def default_prefetch_top(model: MoEModel) -> int:
    """Experts each hint names by default: as many as the router picks. A third candidate lifts the
    reference model's hint recall of the true top-2 from 0.75-0.90 to 0.89-0.98 per layer, but on 2 cores
    the extra reads (each builds a prepacked session on the I/O thread) made decoding slower at every
    budget measured (bench/offload.py --prefetch-top 4 --predictor-width 3); `prefetch-top` widens it."""
    return max(int(layer.router.top_k) for layer in model.layers)


def _add_prefetch(model: MoEModel, graph: ir.Graph, prefetch: bool | None, top: int | None) -> dict[str, Any] | None:
    """Predictor hint outputs after layer 0's input or router (default on when the model has a predictor),
    naming `top` experts per layer, best first (None: the largest router top_k)."""
    predictor = getattr(model, "predictor", None)
    if prefetch is False or (prefetch is None and predictor is None):
        return None
    if predictor is None:
        raise BadInputError("lower{prefetch=true} needs a routing predictor; run the predictor pass first")
    name = value_names(0)["x" if predictor.source == "hidden" else "logits"]
    first = next(v for v in graph.outputs if v.name == name)
    masks: Sequence[Any] = [layer.table.keep_mask.numpy() for layer in model.layers]
    m = top if top is not None else default_prefetch_top(model)
    outputs = add_prefetch_outputs(graph, first, predictor, top=m, keep_masks=masks)
    values = {v.name: v for v in graph.outputs}
    ahead = add_lookahead_outputs(graph, {j: values[value_names(j - 1)["x"]] for j in predictor.ahead_layers},
                                  predictor, top=m, keep_masks=masks)
    far = add_far_outputs(graph, {j: values[value_names(predictor.far_source(j))["x"]] for j in predictor.far_layers},
                          predictor, top=m, keep_masks=masks)
    following = None
    if predictor.next_table is not None:
        following = add_next_output(graph, values["logits"], predictor, top=m)
    early = None
    if predictor.early is not None:
        early = add_early_output(graph, values[value_names(len(model.layers) - 1)["x"]], predictor, top=m,
                                 keep_masks=masks)
    return prefetch_meta(outputs, predictor, m, masks, ahead, following, far, early)
