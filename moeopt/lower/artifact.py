"""The artifact folder: model.onnx (+ external data), tokenizer, manifest.json with every file's sha256.

Built in a temporary sibling folder and renamed into place, so a failed lowering leaves nothing behind
and an existing artifact is only replaced by a complete one. Before the rename, the written artifact is
run in onnxruntime and compared with the model in PyTorch (`parity.measure_parity`); one that differs by
more than its stated tolerance is refused, so a wrong graph never reaches the output folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

import moeopt
from moeopt.errors import BadInputError, VerificationError
from moeopt.ir.checkpoint import TOKENIZER_FILES
from moeopt.ir.model import MoEModel
from moeopt.ir.table import QuantizedMatrix
from moeopt.lower import onnx_linears
from moeopt.lower.export import ExportedDecoder, attention_kind, check_float32, export_decoder
from moeopt.lower.genai import write_genai_files
from moeopt.lower.half_scales import EXTERNAL_MIN_BYTES, has_half_scales, store_half_scales
from moeopt.lower.offload import export_offload
from moeopt.lower.onnx_experts import check_lowerable, lowering_kind
from moeopt.lower.onnx_quant import QuantSettings, check_layers, plan, quant_settings
from moeopt.lower.onnx_quant import kernel_routing as kernel_routing_why
from moeopt.lower.parity import measure_parity, record_parity
from moeopt.lower.profiles import TargetProfile, profile
from moeopt.lower.seq2seq import export_seq2seq
from moeopt.lower.tolerance import parity_tolerance as tolerance_rule
from moeopt.outdir import atomic_dir, commit_dir
from moeopt.runtime.manifest import FORMAT, MANIFEST, MODEL_FILE, PARITY_FILE, VERSION, hash_files


def lower(
    model: MoEModel,
    out: str | Path,
    *,
    target: str = "x86_64",
    threads: int = 0,
    ort_optimize: bool = False,
    kv_cache: bool = True,
    pipeline: str = "",
    accuracy_level: int = 0,
    experts: str = "resident",
    hot: int | None = 2,
    prefetch: bool | None = None,
    prefetch_top: int | None = None,
    overwrite: bool = False,
    verify: bool = True,
    attention: str = "auto",
    kernel_routing: bool = True,
) -> Path:
    """Lower an MoEModel to an ONNX Runtime artifact folder at `out`.

    Decoder-only models become one graph (model.onnx); encoder-decoder ones (Switch) an encoder.onnx run
    once per prompt and a model.onnx decoder with a self-attention cache (kv_cache is then always on).

    Args:
        target: profile whose session settings the manifest records (x86_64, arm64).
        threads: intra-op threads recorded in the profile (0 = ORT's default, all cores).
        ort_optimize: store the graph as ORT optimised it at EXTENDED level (portable across CPUs;
            fusions applied once here instead of at every session start).
        kv_cache: export the graph with past/present key-value inputs/outputs.
        pipeline: the pipeline text that produced the model (recorded in the manifest).
        accuracy_level: the quantized kernels' activation precision (see `onnx_quant.QuantSettings`):
            0 keeps fp32 activations where the kernel can, 4 quantizes them to int8 (faster).
        experts: "resident" (every expert in the graph) or "offload" (hot slots in segment graphs, the
            others in experts.bin; see `moeopt.lower.offload`; needs `moeopt.runtime.OffloadSession`).
        hot: offload mode: hot slots per layer (None: all), unless the model carries a plan.
        prefetch: offload mode: add the routing predictor's hint outputs (None: when it has one).
        prefetch_top: experts each hint output names, best first (None: the router's top_k).
        overwrite: replace an existing non-empty `out`, and then only an artifact or checkpoint folder
            moeopt wrote (see `moeopt.outdir`); without it such a folder is refused before any work.
        verify: run the written artifact in onnxruntime on a probe input against the model in PyTorch
            before it is renamed into place, record the measured max |logit diff| in the manifest
            (``parity_measured``, ``verified``), and refuse it beyond ``parity_tolerance``.
        attention: "auto" (GroupQueryAttention where `lower.attention` covers the model, else as
            exported), "gqa" (insist) or "export" (the attention as torch.export traces it). Recorded as
            the manifest's ``graph.attention``. Resident decoder-only artifacts only: offload and
            encoder-decoder artifacts keep the exported attention.
        kernel_routing: resident artifacts: a layer whose experts are one QMoE node routes in that node
            from the router logits where that is the same function (`onnx_quant.kernel_routing`; recorded
            per layer as ``routing``: "qmoe" or "graph"); False keeps the graph's router everywhere.

    Raises:
        VerificationError: the artifact differs from the model by more than its tolerance (nothing is
            written; the message names both figures).
    """
    if experts not in ("resident", "offload"):
        raise BadInputError(f"experts must be resident or offload, got '{experts}'")
    out = Path(out)
    prof = profile(target, threads)  # a bad target fails before the minute of export
    quant = QuantSettings(accuracy_level, exact=experts == "resident", kernel_routing=kernel_routing)
    check_lowerable(model.layers)
    check_layers(model.layers)
    if experts == "offload" or getattr(model.config, "is_encoder_decoder", False):
        if attention == "gqa":
            raise BadInputError("attention=gqa is for resident decoder-only artifacts (offload and "
                                "encoder-decoder artifacts keep the exported attention)")
        attention = "export"
    attention = attention_kind(model, attention, kv_cache=kv_cache)
    onnx_linears.check_linears(model)
    tmp = atomic_dir(out, overwrite=overwrite)
    try:
        encoder = None
        offload: dict[str, Any] | None = None
        with quant_settings(quant), onnx_linears.matches() as matched:
            if experts == "offload":
                info, offload = export_offload(model, tmp, hot=hot, quant=quant, kv_cache=kv_cache, prefetch=prefetch,
                                              prefetch_top=prefetch_top)
            elif getattr(model.config, "is_encoder_decoder", False):
                check_float32(model)
                info, encoder = export_seq2seq(model, tmp, MODEL_FILE)
            else:
                info = export_decoder(model, tmp / MODEL_FILE, kv_cache=kv_cache, attention=attention)
        onnx_linears.check_matched(model, matched)
        if encoder is None:
            record_parity(model, tmp / PARITY_FILE)
        graphs = [s["file"] for s in offload["segments"]] if offload else [MODEL_FILE]
        if ort_optimize:
            for name in [*graphs, encoder["file"]] if encoder else graphs:
                optimize_offline(tmp / name, prof)
        if has_half_scales(model):
            for name in graphs:
                store_half_scales(tmp / name)
        tokenizer = _copy_tokenizer(model, tmp)
        manifest = build_manifest(model, info, prof, tokenizer=tokenizer, pipeline=pipeline, ort_optimize=ort_optimize,
                                  quant=quant)
        manifest["graph"]["ops"] = contrib_ops(*(tmp / g for g in graphs))
        if offload is None and encoder is None:
            for meta, layer in zip(manifest["layers"], model.layers, strict=True):
                meta["routing"] = "graph" if kernel_routing_why(layer, quant) else "qmoe"
        if offload is not None:  # no single graph: the runtime drives the segments (moeopt.runtime.offload)
            manifest["graph"]["file"] = None
            manifest["offload"] = offload
            plan_dict = getattr(model, "plan", None)
            if isinstance(plan_dict, dict):
                manifest["plan"] = plan_dict
        if any(len(layer.table.quantized) for layer in model.layers) or model.linears:
            manifest["quant"] = {"accuracy_level": quant.accuracy_level}
        if model.linears:
            manifest["quant"]["linears"] = {path: q.meta() for path, q in model.linears.items()}
        if encoder is None:  # measured error model on the parity probe (`moeopt.lower.tolerance`)
            tolerance, manifest["parity_rule"] = tolerance_rule(model, quant, tmp / PARITY_FILE)
        else:  # encoder-decoder: no recorded probe; the fixed rule
            tolerance = parity_tolerance(model, quant)
            manifest["parity_rule"] = {"kind": "fixed"}
        manifest["parity_tolerance"] = tolerance
        manifest["parity_measured"], manifest["verified"] = None, False
        if encoder is not None:  # encoder-decoder: the decoder is "graph", the encoder runs once per prompt
            manifest["encoder"], manifest["parity"] = encoder, None
        manifest["genai"] = write_genai_files(tmp, manifest, model.config)  # before hashing: GenAI's files are listed
        manifest["files"] = hash_files(tmp)  # the manifest lists every file but itself: rewriting it below is safe
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if verify:
            measured = measure_parity(tmp, model, check_hashes=False)  # hash_files just read these bytes
            if not measured <= tolerance:  # NaN fails too
                raise VerificationError(
                    f"{out}: the lowered artifact differs from the model in PyTorch by {measured:.3g} "
                    f"(max |logit diff| on the parity probe), over its tolerance {tolerance:g}; nothing was "
                    "written (--no-verify / verify=False keeps it anyway)")
            manifest["parity_measured"], manifest["verified"] = measured, True
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        commit_dir(tmp, out, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# The fixed rule, for artifacts without a parity probe (encoder-decoder); decoder-only artifacts are held to
# `moeopt.lower.tolerance.parity_tolerance` (these figures as its floor, raised by an error model).
# Max |logit diff| against parity.npz (PyTorch, dequantized weights) that a runtime may show. Measured on the
# reference model: float 1.2e-5 and 4-bit with fp32 activations 1.1e-5 (x86-64 and aarch64 under qemu); on
# the tests' tiny artifacts (float, 2/3/4-bit, offload, encoder-decoder) at most 1.3e-6; int8 activations
# (accuracy_level 4, and ORT's 8-bit QMoE, which always quantizes activations) 0.063. The exact tolerance is
# kept at 1e-3, not tighter: fp32 summation order differs between ORT's kernels and PyTorch's, and that error
# grows with hidden size and depth, so a correct artifact of a large model must not be refused; the tests hold
# the tiny artifacts to 1e-5. A real fault is far above it (one router weight changed: 8e-3).
PARITY_TOL_EXACT = 1e-3
PARITY_TOL_INT8_ACTIVATIONS = 0.25


def parity_tolerance(model: MoEModel, quant: QuantSettings) -> float:
    """The stated parity tolerance of an artifact: exact kernels, or int8 activations somewhere.

    ORT 1.32's CPU kernels quantize activations to int8 for 8-bit weights and for 2-bit weights in blocks
    of 32 or more (tests/test_quant_qmoe.py); the reference model at uniform 2 bits, group 64, differs
    from PyTorch by 0.032 in the logits. Quantized non-expert linears (plain MatMulNBits) keep fp32
    activations at accuracy level 0 for every width and block (2/4/8-bit, blocks 16-128, 1 or 8 rows: within
    3e-5 of the dequantized product, measured), so they do not widen the tolerance; neither do the expert
    groups that `quant.exact` (resident artifacts) lowers through MatMulNBits for that reason.
    """
    formats = [(int(q.bits), int(q.group_size)) for layer in model.layers for q in layer.table.quantized.values()
               if isinstance(q, QuantizedMatrix)]
    int8_act = quant.accuracy_level > 0 or (not quant.exact and any(b == 8 or (b == 2 and g >= 32) for b, g in formats))
    return PARITY_TOL_INT8_ACTIVATIONS if int8_act else PARITY_TOL_EXACT


def optimize_offline(onnx_path: Path, prof: TargetProfile) -> None:
    """Replace `onnx_path` (and its .data) by the graph ORT produces at EXTENDED optimisation level."""
    import onnxruntime as ort

    work = onnx_path.parent / ".ort-opt"
    work.mkdir()
    data_name = onnx_path.name + ".data"
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(work / onnx_path.name)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", data_name)
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                str(EXTERNAL_MIN_BYTES))
    ort.InferenceSession(str(onnx_path), so, providers=list(prof.providers))
    for name in (onnx_path.name, data_name):
        (onnx_path.parent / name).unlink(missing_ok=True)
        if (work / name).exists():
            (work / name).rename(onnx_path.parent / name)
    shutil.rmtree(work)


def contrib_ops(*onnx_paths: Path) -> dict[str, int]:
    """How many nodes of each com.microsoft op the saved graphs hold (weights are not read)."""
    import onnx

    counts: dict[str, int] = {}
    for onnx_path in onnx_paths:
        for node in onnx.load(str(onnx_path), load_external_data=False).graph.node:
            if node.domain == "com.microsoft":
                key = f"{node.domain}.{node.op_type}"
                counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def _copy_tokenizer(model: MoEModel, folder: Path) -> str | None:
    if model.source_dir is None:
        return None
    copied = []
    for name in TOKENIZER_FILES:
        if (model.source_dir / name).exists():
            shutil.copy2(model.source_dir / name, folder / name)
            copied.append(name)
    return "tokenizer.json" if "tokenizer.json" in copied else None


def _versions() -> dict[str, str]:
    """Versions that shaped the graph: the exporter stack, and the ORT it was checked against."""
    import onnx
    import onnxruntime
    import onnxscript
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__, "onnxruntime": onnxruntime.__version__}


def _token_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def build_manifest(
    model: MoEModel, info: ExportedDecoder, prof: TargetProfile, *, tokenizer: str | None, pipeline: str,
    ort_optimize: bool, quant: QuantSettings | None = None,
) -> dict[str, Any]:
    """Everything a runtime (or a person) needs besides the files themselves."""
    cfg = model.config
    gen = getattr(model.hf, "generation_config", None)
    eos = _token_ids(getattr(gen, "eos_token_id", None) or getattr(cfg, "eos_token_id", None))
    layers = []
    for layer in model.layers:
        meta = layer.meta()
        meta["keep_mask"] = [bool(v) for v in layer.table.keep_mask.tolist()]
        meta["slot_of"] = [int(v) for v in layer.table.slot_of.tolist()]
        meta["bits"] = [s.bits for s in layer.table.slots]
        meta["lowered_as"] = lowering_kind(layer)
        if len(layer.table.quantized):
            meta["groups"] = [g.to_dict() for g in plan(layer, quant)]
        layers.append(meta)
    cache = info.cache
    return {
        "format": FORMAT,
        "version": VERSION,
        "producer": f"moeopt {moeopt.__version__}",
        "versions": _versions(),
        "source": model.source,
        "architecture": model.architecture,
        "model_class": type(model.hf).__name__,
        "history": list(model.history),
        "pipeline": pipeline,
        "target": prof.to_dict(),
        "graph": {
            "file": MODEL_FILE,
            "inputs": info.inputs,
            "outputs": info.outputs,
            "ort_optimized": "extended" if ort_optimize else None,
            "attention": info.attention,
            "moe_nodes": info.moe_nodes,
            "dense_moe_layers": info.dense_layers,
            "kv_cache": None if cache is None else {
                "num_layers": cache.num_layers, "key_heads": cache.key_heads, "key_dim": cache.key_dim,
                "value_heads": cache.value_heads, "value_dim": cache.value_dim, "dtype": "float32",
                # GroupQueryAttention writes present into the bound past buffer (GenAI's
                # past_present_share_buffer); the exported attention concatenates a new present.
                "shared_buffer": info.attention == "gqa",
            },
        },
        "vocab_size": int(cfg.vocab_size),
        "max_positions": getattr(cfg, "max_position_embeddings", None),
        "tokens": {
            "eos": eos,
            "bos": _token_ids(getattr(cfg, "bos_token_id", None)),
            "pad": _token_ids(getattr(cfg, "pad_token_id", None)),
        },
        "tokenizer": tokenizer,
        "parity": PARITY_FILE,
        "layers": layers,
    }
