"""Export an MoEModel's decoder to ONNX, each MoE layer lowered by `translate.moe_layer_onnx`."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moeopt.errors import UnsupportedModelError
from moeopt.ir.layer import layers_as_ops
from moeopt.ir.model import MoEModel
from moeopt.lower import attention as gqa
from moeopt.lower import graph_passes, onnx_linears
from moeopt.lower.decoder import CacheLayout, DecoderNoCache, DecoderWithCache, probe_cache_layout
from moeopt.lower.rewriter_speed import fast_multi_output_matching
from moeopt.lower.translate import STATS, layers_by_name, translation_table

BASE_INPUTS = ("input_ids", "attention_mask", "position_ids")


def check_float32(model: MoEModel) -> None:
    if model.dtype != torch.float32:
        raise UnsupportedModelError(
            f"lowering needs float32 weights (ORT's CPU MoE kernel is fp32 only), got {model.dtype}; "
            "load the model with dtype=torch.float32"
        )


@dataclass(frozen=True)
class ExportedDecoder:
    """What the artifact's manifest needs to know about the exported graph."""

    inputs: list[str]
    outputs: list[str]
    cache: CacheLayout | None
    moe_nodes: int  # layers lowered to com.microsoft.MoE
    dense_layers: int  # layers lowered to plain ops
    folded_weights: int
    attention: str = "export"  # "gqa": one com.microsoft.GroupQueryAttention per layer (see lower.attention)


def attention_kind(model: MoEModel, attention: str, *, kv_cache: bool = True) -> str:
    """The attention lowering `lower{attention=...}` resolves to: "gqa" or "export".

    auto takes GroupQueryAttention where `attention.gqa_unsupported` finds nothing against it; gqa insists.

    Raises:
        UnsupportedModelError: attention=gqa for a model (or a graph without a cache) it does not cover.
    """
    if attention not in gqa.ATTENTION_KINDS:
        raise UnsupportedModelError(f"attention must be one of {', '.join(gqa.ATTENTION_KINDS)}, got '{attention}'")
    if attention == "export":
        return "export"
    why = "GroupQueryAttention needs the KV cache (kv-cache=false)" if not kv_cache else gqa.gqa_unsupported(model.hf)
    if why is None:
        return "gqa"
    if attention == "gqa":
        raise UnsupportedModelError(f"attention=gqa: {why}")
    return "export"


def export_decoder(
    model: MoEModel, onnx_path: Path, *, kv_cache: bool = True, attention: str = "export",
) -> ExportedDecoder:
    """Write `onnx_path` (+ `onnx_path.data`, external weights) for a decoder-only model.

    Args:
        attention: "export" (the attention as torch.export traces it) or "gqa" (one GroupQueryAttention
            node per layer; `attention_kind` decides which a model gets).

    Raises:
        UnsupportedModelError: for encoder-decoder models (see `seq2seq`) and non-float32 weights.
    """
    if getattr(model.config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{model.architecture}: encoder-decoder models go through lower.seq2seq")
    check_float32(model)
    hf = model.hf.eval()
    layout = probe_cache_layout(hf) if kv_cache else None
    b, t, p = 2, 3, 4  # distinct sizes, none 0 or 1, so export cannot specialise a dim to another
    ids = torch.randint(0, int(model.config.vocab_size), (b, t), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(b, p + t, dtype=torch.long) if layout else torch.ones(b, t, dtype=torch.long)
    pos = torch.arange(p, p + t).expand(b, t).contiguous() if layout else torch.arange(t).expand(b, t).contiguous()
    dyn = torch.export.Dim.DYNAMIC
    two_d = {0: dyn, 1: dyn}
    module: torch.nn.Module
    patch: Any = contextlib.nullcontext()
    extra: dict[Any, Any] = {}
    if attention == "gqa":
        if layout is None:
            raise UnsupportedModelError("attention=gqa needs the KV cache")
        patch, extra = gqa.attention_as_ops(hf), gqa.translation_table()
    if layout is not None:
        module = DecoderWithCache(hf, layout)
        past = layout.empty(b, p)
        args: tuple[Any, ...] = (ids, mask, pos, *past)
        shapes: tuple[Any, ...] = (two_d, two_d, two_d, tuple({0: dyn, 2: dyn} for _ in past))
        inputs, outputs = [*BASE_INPUTS, *layout.input_names()], ["logits", *layout.output_names()]
    else:
        module = DecoderNoCache(hf)
        args, shapes = (ids, mask, pos), (two_d, two_d, two_d)
        inputs, outputs = list(BASE_INPUTS), ["logits"]
    with patch as holder:
        if holder is not None and isinstance(module, DecoderWithCache):
            module.mask_holder = holder
        moe, dense, folded = onnx_export(model, module, args, shapes, inputs, outputs, onnx_path,
                                         _dim_names(layout), extra_ops=extra, fuse_norms=attention == "gqa")
    if attention == "gqa":
        inputs = _graph_inputs(onnx_path)  # position_ids is unused (GroupQueryAttention derives positions)
    return ExportedDecoder(inputs, outputs, layout, moe, dense, folded, attention)


def _graph_inputs(onnx_path: Path) -> list[str]:
    import onnx

    return [i.name for i in onnx.load(str(onnx_path), load_external_data=False).graph.input]


def onnx_export(
    model: MoEModel, module: torch.nn.Module, args: tuple[Any, ...], shapes: tuple[Any, ...], inputs: list[str],
    outputs: list[str], onnx_path: Path, dim_names: dict[str, dict[int, str]], *,
    extra_ops: dict[Any, Any] | None = None, fuse_norms: bool = False,
) -> tuple[int, int, int]:
    """Export `module` (which runs `model.hf`) to `onnx_path` + external data; MoE layers translated.

    Returns:
        (layers lowered to com.microsoft.MoE, layers lowered to plain ops, weights folded).
    """
    # Translation looks a layer up by its w_in initializer name ("hf." + the path in the host model).
    names = {f"hf.{layer.path}.table.w_in": layer for layer in model.layers}
    before = dict(STATS)
    with layers_as_ops(), layers_by_name(names), torch.no_grad(), _quiet(), fast_multi_output_matching():
        program = torch.onnx.export(
            module, args, dynamo=True, custom_translation_table={**translation_table(), **(extra_ops or {})},
            dynamic_shapes=shapes,
            input_names=inputs, output_names=outputs, optimize=True, verbose=False,
        )
    if program is None:  # only when exporting to a file, which this does not
        raise RuntimeError("torch.onnx.export returned no program")
    ir_model = program.model
    folded = graph_passes.fold_weight_layout(ir_model)
    onnx_linears.replace_linears(ir_model, model)  # quantized non-expert linears -> MatMulNBits
    if fuse_norms:  # GroupQueryAttention graphs
        graph_passes.fuse_rms_norm(ir_model)
        graph_passes.fuse_qkv(ir_model)
    graph_passes.name_dynamic_dims(ir_model, dim_names)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    data = onnx_path.with_name(onnx_path.name + ".data")
    data.unlink(missing_ok=True)  # onnx.save appends to an existing .data file
    program.save(str(onnx_path), external_data=True)
    return STATS["moe-nodes"] - before["moe-nodes"], STATS["dense-layers"] - before["dense-layers"], folded


def _dim_names(layout: CacheLayout | None) -> dict[str, dict[int, str]]:
    names: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
    }
    if layout is not None:
        for name in layout.input_names():
            names[name] = {0: "batch", 2: "past_sequence"}
    return names


@contextlib.contextmanager
def _quiet() -> Any:
    """The exporter prints progress lines and warnings that say nothing to a moeopt user."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
