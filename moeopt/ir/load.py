"""`moeopt.load`: a Hugging Face checkpoint, a transformers model or a moeopt checkpoint -> MoEModel."""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeopt.errors import BadInputError, MoeOptError, UnsupportedModelError
from moeopt.ir.adapters import GENERIC, adapter_for, build_layer
from moeopt.ir.adapters.base import find_experts
from moeopt.ir.adapters.unsupported import unsupported_reason
from moeopt.ir.layer import MoELayer
from moeopt.ir.lowerable import check_cache
from moeopt.ir.model import MoEModel
from moeopt.ir.mxfp4 import is_mxfp4_config
from moeopt.ir.safetensors_check import TensorInfo, checkpoint_tensors
from moeopt.ir.spec import RouterSpec

META_FILE = "moeopt.json"


def load(
    src: str | Path | nn.Module | MoEModel,
    *,
    dtype: torch.dtype = torch.float32,
    check: bool = True,
    inplace: bool = False,
) -> MoEModel:
    """Load a model into the IR.

    Args:
        src: a checkpoint folder (Hugging Face: config.json + safetensors shards; or a folder written by
            `MoEModel.save`), an in-memory transformers model, or an MoEModel (returned as is).
        dtype: compute dtype of the IR (float32 by default: CPU kernels and exact comparisons want it).
        check: run every converted layer against its source block on a probe input (cheap; turn off
            only for very large models you have converted before).
        inplace: for an in-memory model, replace its blocks in place instead of converting a copy.
    """
    if isinstance(src, MoEModel):
        return src
    if isinstance(src, (str, Path)):
        path = Path(src)
        tensors = _check_folder(path)
        if (path / META_FILE).exists():
            from moeopt.ir.checkpoint import load_checkpoint

            return load_checkpoint(path, dtype=dtype)
        hf = _load_hf(path, dtype, tensors)
        model = _wrap(hf, str(path), path, check)
        model.storage_dtype = _config_dtype(path)
        return model
    if isinstance(src, nn.Module):
        hf = src if inplace else copy.deepcopy(src)
        hf.to(dtype)
        return _wrap(hf, type(src).__name__, None, check)
    raise BadInputError(f"cannot load a {type(src).__name__}: expected a checkpoint path or a transformers model")


def load_skeleton(src: str | Path) -> MoEModel:
    """The IR of a checkpoint folder without its weights: every tensor on the meta device.

    Shapes, dtypes and bytes come from config.json and the safetensors headers (and the shard index),
    so this costs the same on a 100 GB checkpoint as on a tiny one and reads no weight at all: what
    `moeopt inspect` needs. A block class whose router semantics are inferred by probing (no named
    adapter) is probed once on a copy holding random values. The host's two-token cache check
    (`check_cache`) needs weights and is left to a full `load`.
    """
    path = Path(src)
    tensors = _check_folder(path)
    if (path / META_FILE).exists():
        from moeopt.ir.checkpoint import load_checkpoint

        return load_checkpoint(path, skeleton=tensors)
    config, auto = _hf_config(path)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        with torch.device("meta"):
            hf = auto.from_config(config, dtype=torch.float32)
    except ValueError as e:
        raise UnsupportedModelError(f"{path}: {type(config).__name__} has no {auto.__name__} class") from e
    _check_coverage(path, hf, tensors)
    hf.eval()
    disable_router_outputs(hf)
    layers, used = convert_blocks(hf, check=False, probe=_random_copy)
    model = MoEModel(hf=hf, layers=layers, source=str(path), source_dir=path, adapters=used)
    model.storage_dtype = _config_dtype(path)
    return model


def _random_copy(block: nn.Module) -> nn.Module:
    """A copy of a meta-device block with seeded random values, to probe its router semantics on."""
    g = torch.Generator().manual_seed(0)
    probe = copy.deepcopy(block).to_empty(device="cpu")
    with torch.no_grad():
        for t in [*probe.parameters(), *probe.buffers()]:
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.05)
    return probe


def _check_coverage(path: Path, hf: nn.Module, tensors: dict[str, TensorInfo]) -> None:
    """Refuse a checkpoint whose shards hold fewer values than its config's model has parameters.

    Checkpoint names differ from module names (transformers renames and fuses per-expert tensors on
    load), but the number of values does not: fewer is a checkpoint missing tensors. Packed formats
    (MXFP4 experts) store fewer values than they decode to and are not compared.
    """
    if is_mxfp4_config(json.loads((path / "config.json").read_text())):
        return
    have = sum(t.numel for t in tensors.values())
    seen: set[int] = set()
    need = 0
    for p in hf.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            need += p.numel()
    if tensors and have < need:
        raise BadInputError(
            f"{path}: its shards hold {have:,} values but its config's model has {need:,} parameters "
            "(tensors missing from the checkpoint)"
        )


def disable_router_outputs(hf: nn.Module) -> None:
    """Turn off transformers' router-logit outputs (the load-balancing loss of training).

    They are collected from the source router modules, which MoELayer replaces; left on, every forward
    fails. The IR exposes routing through MoELayer observers instead.
    """
    config: Any = getattr(hf, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else None
    for cfg in (config, text_config):
        if cfg is not None and getattr(cfg, "output_router_logits", False):
            cfg.output_router_logits = False


def _wrap(hf: nn.Module, source: str, source_dir: Path | None, check: bool) -> MoEModel:
    hf.eval()
    disable_router_outputs(hf)
    layers, used = convert_blocks(hf, check=check)
    check_cache(hf)
    return MoEModel(hf=hf, layers=layers, source=source, source_dir=source_dir, adapters=used)


def convert_blocks(
    hf: nn.Module, *, check: bool = True, probe: Callable[[nn.Module], nn.Module] | None = None
) -> tuple[list[MoELayer], dict[str, str]]:
    """Replace every MoE block of `hf` by an equivalent MoELayer, in module order.

    With `probe` (a skeleton whose weights are on the meta device), blocks are converted unchecked and a
    block class without an adapter's router semantics has them inferred once on `probe(block)`, a copy
    holding values, instead of on the block itself.
    """
    config = getattr(hf, "config", None)
    found: list[tuple[str, nn.Module, Any]] = []
    suspicious: list[str] = []
    skip: tuple[str, ...] = ()
    for name, mod in hf.named_modules():
        if skip and name.startswith(skip):
            continue
        reason = unsupported_reason(type(mod).__name__)
        if reason is not None:
            raise UnsupportedModelError(f"{type(hf).__name__}: {type(mod).__name__} at '{name}': {reason}")
        adapter = adapter_for(mod)
        if adapter is not None:
            found.append((name, mod, adapter))
            skip = (*skip, name + ".")
        elif find_experts(mod) is not None:
            suspicious.append(f"{type(mod).__name__} at '{name}'")
    if not found:
        cls = type(hf).__name__
        if suspicious:
            raise UnsupportedModelError(
                f"{cls}: block {suspicious[0]} has an `experts` child but no recognisable router "
                "(gate/router/wg/classifier with an (E, H) weight) or expert MLPs"
            )
        raise UnsupportedModelError(f"{cls} has no MoE blocks: moeopt compiles Mixture-of-Experts models")
    layers: list[MoELayer] = []
    used: dict[str, str] = {}
    inferred: dict[str, RouterSpec] = {}  # block class -> router semantics found by probing its first block
    for i, (name, block, adapter) in enumerate(found):
        cls_name = type(block).__name__
        cached = inferred.get(cls_name)
        try:
            if probe is not None:
                layer = _build_unweighted(block, adapter, config, i, name, cached, probe)
            else:
                layer = build_layer(block, adapter, config, index=i, path=name, check=check, cached_spec=cached)
        except UnsupportedModelError:
            if adapter is GENERIC and cached is None:
                raise
            # The named adapter's (or a previous layer's) semantics did not hold here: search them.
            adapter = GENERIC
            if probe is not None:
                layer = _build_unweighted(block, GENERIC, config, i, name, None, probe)
            else:
                layer = build_layer(block, GENERIC, config, index=i, path=name, check=check)
        if adapter is GENERIC:
            inferred.setdefault(cls_name, layer.router)
        used[cls_name] = adapter.name
        _set_submodule(hf, name, layer)
        layers.append(layer)
    return layers, used


def _build_unweighted(
    block: nn.Module, adapter: Any, config: Any, index: int, path: str, cached: RouterSpec | None,
    probe: Callable[[nn.Module], nn.Module],
) -> MoELayer:
    """The MoELayer of a meta-device block: its router semantics (unless the adapter states them) and
    any conversion step that computes on values run on `probe(block)`, one block at a time."""
    if cached is None and adapter.router_spec is None:
        cached = build_layer(probe(block), adapter, config, index=index, path=path, check=True).router
    try:
        return build_layer(block, adapter, config, index=index, path=path, check=False, cached_spec=cached)
    except (UnsupportedModelError, RuntimeError, NotImplementedError):
        # A part recognised by what it computes (a fused clamped-SwiGLU shared expert): convert a copy
        # holding values, then drop the values.
        layer = build_layer(probe(block), adapter, config, index=index, path=path, check=True, cached_spec=cached)
        for mod in layer.modules():
            for key, p in mod._parameters.items():
                if p is not None:
                    mod._parameters[key] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
            for key, b in mod._buffers.items():
                if b is not None and b.is_floating_point():
                    mod._buffers[key] = torch.empty_like(b, device="meta")
        return layer


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, attr, new)


def _check_folder(path: Path) -> dict[str, TensorInfo]:
    """Refuse a folder that is not a readable checkpoint; its tensors from the shard headers (no weights)."""
    if not path.exists():
        raise BadInputError(f"no such checkpoint folder: {path}")
    if not path.is_dir():
        raise BadInputError(f"{path} is a file: expected a checkpoint folder (config.json + *.safetensors)")
    cfg = path / "config.json"
    if not cfg.exists():
        raise BadInputError(f"{path}: no config.json, not a Hugging Face or moeopt checkpoint folder")
    try:
        json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInputError(f"{cfg}: corrupt config.json ({e.__class__.__name__})") from e
    tensors = checkpoint_tensors(path)
    if not tensors and not list(path.glob("*.safetensors")) and not list(path.glob("*.bin")):
        raise BadInputError(f"{path}: no weight files (*.safetensors)")
    return tensors


def _hf_config(path: Path) -> tuple[Any, Any]:
    """The transformers config of a checkpoint folder and the auto class that builds its model."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError) as e:
        mt = json.loads((path / "config.json").read_text()).get("model_type", "?")
        raise UnsupportedModelError(
            f"{path}: model_type '{mt}' is not known to transformers {transformers.__version__}"
        ) from e
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    return config, auto


_HALF = {"BF16": torch.bfloat16, "F16": torch.float16}


def _load_hf(path: Path, dtype: torch.dtype, tensors: dict[str, TensorInfo] | None = None) -> nn.Module:
    """The transformers model of a checkpoint folder, its floating tensors in `dtype`.

    A checkpoint stored in one 16-bit dtype wider than none of `dtype` is read in its own dtype and
    then upcast one tensor at a time: transformers converts the whole model at once, so reading a
    bfloat16 checkpoint as float32 held the float32 model, its converted copies and the mapped
    shards together (9.0 GiB peak for 2.0 GB of bfloat16, bench/scale.py), where this holds the
    16-bit model and then one tensor beside the growing float32 one (exact: 16-bit -> float32 is).
    """
    import transformers

    config, auto = _hf_config(path)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()  # one line per error, no per-tensor bars
    extra: dict[str, Any] = {}
    mxfp4 = is_mxfp4_config(json.loads((path / "config.json").read_text()))
    if mxfp4:
        # gpt-oss as shipped: MXFP4 experts, dequantized to `dtype` (the IR holds float experts; without
        # this, a machine with triton kernels would keep them packed in a form moeopt cannot read).
        extra["quantization_config"] = transformers.Mxfp4Config(dequantize=True)  # type: ignore[attr-defined]
    floats = {t.dtype for t in (tensors or {}).values() if t.dtype.startswith(("F", "BF"))}
    stored = _HALF.get(next(iter(floats))) if len(floats) == 1 and not mxfp4 else None
    read_as = stored if stored is not None and dtype == torch.float32 else dtype
    try:
        hf, info = auto.from_pretrained(path, dtype=read_as, output_loading_info=True, **extra)  # type: ignore[misc]
        if read_as != dtype and not cast_each(hf, dtype):
            del hf  # a buffer computed at load in the 16-bit dtype: read it as before, in `dtype`
            hf, info = auto.from_pretrained(path, dtype=dtype, output_loading_info=True, **extra)  # type: ignore[misc]
    except MoeOptError:
        raise
    except ValueError as e:
        raise UnsupportedModelError(f"{path}: {type(config).__name__} has no {auto.__name__} class") from e
    except Exception as e:  # transformers/safetensors raise many kinds; the user needs one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInputError(f"cannot load weights from {path}: {first}") from e
    missing = [k for k in info.get("missing_keys", []) if not _is_tied(hf, k)]
    if missing:
        raise BadInputError(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. '{sorted(missing)[0]}'")
    return hf  # type: ignore[no-any-return]


def cast_each(hf: nn.Module, dtype: torch.dtype) -> bool:
    """Cast floating parameters and buffers to `dtype` in place, one tensor at a time (`Module.to`
    holds the model in both dtypes until it returns; this holds one tensor twice).

    False (nothing cast) when a non-persistent floating buffer is not already in `dtype`: such a buffer
    was computed at load time in another dtype, and cast it would differ from one built in `dtype`.
    """
    for mod in hf.modules():
        for name in mod._non_persistent_buffers_set:
            b = mod._buffers.get(name)
            if b is not None and b.is_floating_point() and b.dtype != dtype:
                return False
    for mod in hf.modules():
        for p in mod._parameters.values():
            if p is not None and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)  # tied parameters are one object: cast once
        for name, b in mod._buffers.items():
            if b is not None and b.is_floating_point() and b.dtype != dtype:
                mod._buffers[name] = b.to(dtype)
    config: Any = getattr(hf, "config", None)
    if config is not None:
        config.dtype = dtype  # as a load in `dtype` records it
    return True


def _config_dtype(path: Path) -> str:
    cfg = json.loads((path / "config.json").read_text())
    d = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return d if d in ("float32", "float16", "bfloat16") else "float32"


def _is_tied(hf: nn.Module, key: str) -> bool:
    tied = getattr(hf, "_tied_weights_keys", None) or {}
    return key in tied
