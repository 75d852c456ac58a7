"""moeopt checkpoints: config.json + model.safetensors + moeopt.json (+ tokenizer files), written atomically.

The host model's config is the source config unchanged (router width = original experts); the expert
tables in moeopt.json say which slots exist, so a compressed model stays compressed on disk.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from moeopt.errors import BadInputError
from moeopt.ir.layer import DenseExpert, MoELayer
from moeopt.ir.model import MoEModel
from moeopt.ir.safetensors_check import INDEX_FILE, TensorInfo
from moeopt.ir.spec import ExpertSpec, RouterSpec, SharedSpec
from moeopt.ir.table import ExpertTable, QuantizedMatrix, SlotInfo
from moeopt.outdir import atomic_dir, commit_dir

FORMAT = "moeopt-checkpoint"
VERSION = 1
META_FILE = "moeopt.json"
WEIGHTS_FILE = "model.safetensors"
SHARD_BYTES = 1 << 30  # weights above this are saved in shards of at most this (one tensor may exceed it)
PREDICTOR_FILE = "predictor.safetensors"
LINEARS_FILE = "linears.safetensors"  # packed non-expert linears: "{path}.packed" / ".scales" / ".zero_points"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "generation_config.json",
)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def save_checkpoint(
    model: MoEModel, path: Path, *, dtype: torch.dtype | None = None, overwrite: bool = False,
    shard_bytes: int = SHARD_BYTES,
) -> Path:
    """Write `model` to the folder `path` (built in a temporary folder, renamed into place).

    An existing non-empty `path` is refused unless `overwrite`, and then only if moeopt wrote it
    (see `moeopt.outdir`). Weights above `shard_bytes` are written shard by shard, with an index as
    transformers writes one, so that saving holds one shard's converted copy, not the model's.
    """
    save_dtype = dtype or _DTYPES.get(model.storage_dtype, torch.float32)
    tmp = atomic_dir(path, overwrite=overwrite)
    try:
        model.config.save_pretrained(tmp)
        sources: dict[str, torch.Tensor] = {}
        tied: dict[str, str] = {}
        seen: dict[tuple[int, tuple[int, ...]], str] = {}
        for key, t in model.hf.state_dict().items():
            ident = (t.data_ptr(), tuple(t.shape))
            if t.numel() and ident in seen:  # tied weights: safetensors refuses shared storage
                tied[key] = seen[ident]
                continue
            seen[ident] = key
            sources[key] = t
        _save_shards(sources, save_dtype, tmp, shard_bytes)
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "source": model.source,
            "architecture": model.architecture,
            "model_class": type(model.hf).__name__,
            "storage_dtype": str(save_dtype).removeprefix("torch."),
            "adapters": model.adapters,
            "history": model.history,
            "tied": tied,
            "layers": [layer.meta() for layer in model.layers],
            "predictor": None if model.predictor is None else model.predictor.meta(),  # type: ignore[operator]
            "plan": model.plan,
        }
        if model.linears:
            meta["linears"] = {path: q.meta() for path, q in model.linears.items()}
            packed = {f"{path}.{name}": t.detach().contiguous() for path, q in model.linears.items()
                      for name, t in q.named_buffers() if t is not None}
            save_file(packed, str(tmp / LINEARS_FILE), metadata=ST_METADATA)
        if model.predictor is not None:
            pred = {k: v.detach().float().contiguous() for k, v in model.predictor.state_dict().items()}
            save_file(pred, str(tmp / PREDICTOR_FILE), metadata=ST_METADATA)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        if model.source_dir is not None:
            for name in TOKENIZER_FILES:
                if (model.source_dir / name).exists():
                    shutil.copy2(model.source_dir / name, tmp / name)
        commit_dir(tmp, path, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# One key only: safetensors (0.8) serializes __metadata__ from a hash map whose order changes from process to
# process, so two keys made two runs' bytes differ (measured: 6 of 12 processes wrote each order).
ST_METADATA = {"format": "pt"}


def _save_shards(sources: dict[str, torch.Tensor], dtype: torch.dtype, folder: Path, shard_bytes: int) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors + index when above `shard_bytes`."""

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * (torch.finfo(dtype).bits // 8 if t.is_floating_point() else t.element_size())

    groups: list[list[str]] = [[]]
    size = 0
    for key, t in sources.items():  # state-dict order: a decoder layer's tensors stay together
        if groups[-1] and size + nbytes(t) > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes(t)
    names = [WEIGHTS_FILE] if len(groups) == 1 else [
        f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for name, keys in zip(names, groups, strict=True):
        tensors = {k: (sources[k].to(dtype) if sources[k].is_floating_point() else sources[k]).detach().contiguous()
                   for k in keys}
        save_file(tensors, str(folder / name), metadata=ST_METADATA)
        del tensors
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(nbytes(t) for t in sources.values())},
                 "weight_map": {k: name for name, keys in zip(names, groups, strict=True) for k in keys}}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=1))


def _weight_files(path: Path) -> list[Path]:
    """The weight files of a moeopt checkpoint: its shards in index order, or model.safetensors."""
    if (path / INDEX_FILE).exists():
        weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        return [path / name for name in dict.fromkeys(weight_map.values())]
    if not (path / WEIGHTS_FILE).exists():
        raise BadInputError(f"{path}: missing {WEIGHTS_FILE}")
    return [path / WEIGHTS_FILE]


def load_checkpoint(
    path: Path, *, dtype: torch.dtype = torch.float32, skeleton: dict[str, TensorInfo] | None = None
) -> MoEModel:
    """Read a folder written by `save_checkpoint` back into an identical IR.

    With `skeleton` (the folder's tensors from their headers), weights stay on the meta device with
    the saved shapes; only small tensors (expert masks and maps, biases) are read, so that counts and
    bytes, quantized ones included, are those of the full load.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from moeopt.ir.load import _set_submodule, cast_each, disable_router_outputs

    try:
        meta = json.loads((path / META_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInputError(f"{path / META_FILE}: corrupt moeopt metadata ({e.__class__.__name__})") from e
    if meta.get("format") != FORMAT or int(meta.get("version", -1)) > VERSION:
        raise BadInputError(f"{path}: unsupported moeopt checkpoint format {meta.get('format')} v{meta.get('version')}")
    files = _weight_files(path)
    config = AutoConfig.from_pretrained(path)
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    with init_empty_weights(include_buffers=False):
        hf = auto.from_config(config)
    layers = []
    for lm in meta["layers"]:
        layer = _empty_layer(lm)
        _set_submodule(hf, lm["path"], layer)
        layers.append(layer)
    # Fresh (aligned) allocations: tensors read at arbitrary file offsets send MKL down other GEMM paths
    # whose rounding differs in the last bit, and a round trip must be bit-identical.
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if skeleton is not None:
            state.update(_skeleton_state(file, skeleton))
        else:
            state.update({k: v.clone() for k, v in load_file(str(file)).items()})
    for alias, key in meta.get("tied", {}).items():
        state[alias] = state[key]
    result = hf.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        what = result.missing_keys[:1] or result.unexpected_keys[:1]
        kind = "lacks" if result.missing_keys else "has unexpected"
        raise BadInputError(f"{path}: checkpoint {kind} tensor '{what[0]}'")
    del state  # the parameters own the tensors now: cast_each frees each stored-dtype one as it goes
    if not cast_each(hf, dtype):
        hf.to(dtype)
    hf.eval()
    disable_router_outputs(hf)
    predictor = None
    if meta.get("predictor") and skeleton is not None:
        from moeopt.ir.predictor import RoutingPredictor

        predictor = RoutingPredictor.from_meta(meta["predictor"]).to("meta")
    elif meta.get("predictor"):
        from moeopt.ir.predictor import RoutingPredictor
        from moeopt.ir.safetensors_check import check_safetensors

        if not (path / PREDICTOR_FILE).exists():
            raise BadInputError(f"{path}: moeopt.json lists a routing predictor but {PREDICTOR_FILE} is missing")
        check_safetensors(path / PREDICTOR_FILE)
        predictor = RoutingPredictor.from_meta(meta["predictor"])
        predictor.load_state_dict(load_file(str(path / PREDICTOR_FILE)))
        predictor.eval()
    model = MoEModel(
        hf=hf, layers=layers, source=meta.get("source", str(path)), source_dir=path, predictor=predictor,
        history=list(meta.get("history", [])), adapters=dict(meta.get("adapters", {})),
        storage_dtype=meta.get("storage_dtype", "float32"), plan=meta.get("plan"),
        linears=_load_linears(path, meta.get("linears") or {}),
    )
    return model


SMALL_TENSOR = 1 << 16  # bytes: a skeleton reads 1-D tensors this small (masks, slot maps, biases)
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _skeleton_state(weights: Path, tensors: dict[str, TensorInfo]) -> dict[str, torch.Tensor]:
    """Meta tensors of the saved shapes and dtypes; 1-D tensors under SMALL_TENSOR bytes read for real."""
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    with safe_open(str(weights), "pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            info = tensors[key]
            if (len(info.shape) <= 1 and info.nbytes < SMALL_TENSOR) or info.dtype not in _ST_DTYPES:
                state[key] = f.get_tensor(key).clone()
            else:
                state[key] = torch.empty(info.shape, dtype=_ST_DTYPES[info.dtype], device="meta")
    return state


def _load_linears(path: Path, metas: dict[str, Any]) -> dict[str, QuantizedMatrix]:
    """The packed non-expert linears listed in moeopt.json, read from LINEARS_FILE."""
    if not metas:
        return {}
    from moeopt.ir.safetensors_check import check_safetensors

    if not (path / LINEARS_FILE).exists():
        raise BadInputError(f"{path}: moeopt.json lists quantized linears but {LINEARS_FILE} is missing")
    check_safetensors(path / LINEARS_FILE)
    state = load_file(str(path / LINEARS_FILE))
    out = {}
    for name, qm in metas.items():
        try:
            zp = state[f"{name}.zero_points"].clone() if qm["has_zero_points"] else None
            out[name] = QuantizedMatrix(qm["rows"], qm["cols"], qm["bits"], qm["group_size"], qm["symmetric"],
                                        state[f"{name}.packed"].clone(), state[f"{name}.scales"].clone(), zp)
        except KeyError as e:
            raise BadInputError(f"{path / LINEARS_FILE}: lacks tensor {e}") from None
    return out


def _meta_tensor(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def _empty_layer(lm: dict[str, Any]) -> MoELayer:
    """A MoELayer with placeholder tensors of the right structure; load_state_dict(assign=True) fills it."""
    router = RouterSpec.from_dict(lm["router"])
    tm = lm["table"]
    spec = ExpertSpec.from_dict(tm["spec"])
    slots = [SlotInfo.from_dict(s) for s in tm["slots"]]
    n, h, i = len(slots), spec.hidden, spec.intermediate
    table = ExpertTable(
        spec, router.num_experts, _meta_tensor(n, spec.in_rows, h), _meta_tensor(n, h, i),
        _meta_tensor(n, spec.in_rows) if tm["has_bias"] else None, _meta_tensor(n, h) if tm["has_bias"] else None,
        slots=slots, keep_mask=_meta_tensor(router.num_experts, dtype=torch.bool),
        slot_of=_meta_tensor(router.num_experts, dtype=torch.int64),
    )
    for key, qm in tm.get("quantized", {}).items():
        table.quantized[key] = QuantizedMatrix(
            qm["rows"], qm["cols"], qm["bits"], qm["group_size"], qm["symmetric"], _meta_tensor(0, dtype=torch.uint8),
            _meta_tensor(0), _meta_tensor(0, dtype=torch.uint8) if qm["has_zero_points"] else None,
        )
    shared = [DenseExpert(SharedSpec.from_dict(s), h).to("meta") for s in lm["shared"]]
    return MoELayer(
        router, table, _meta_tensor(router.num_experts, h),
        _meta_tensor(router.num_experts) if lm["has_router_bias"] else None,
        _meta_tensor(router.num_experts) if lm["has_score_bias"] else None, shared,
        index=lm["index"], path=lm["path"], source_class=lm.get("source_class", ""),
        tuple_output=bool(lm.get("tuple_output", False)),
    )
