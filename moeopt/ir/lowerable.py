"""What the lowering needs of a host model beyond its MoE blocks, checked when it is loaded.

The lowered graph carries the decoder's cache as one key and one value tensor per layer, all layers of
one shape (`moeopt.lower.decoder.CacheLayout`). Hybrid models whose layers keep a recurrent state
(linear attention, Mamba, short convolutions) or whose layers cache keys of different shapes cannot be
lowered that way; `moeopt.load` refuses them here with the feature named, rather than letting the
export fail a minute later deep inside torch.export.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from moeopt.errors import UnsupportedModelError

# Cache layers the lowering's flat key/value interface reproduces (sliding windows are in the mask).
KV_LAYERS = ("DynamicLayer", "DynamicSlidingWindowLayer")
CACHE_FEATURES = {
    "LinearAttentionLayer": "recurrent state of linear attention / Mamba / short convolutions",
    "DynamicIndexedLayer": "indexer keys of DeepSeek sparse attention",
    "DummyLayer": "a layer with no attention cache (Mamba / MLP-only layers)",
}


RECURRENT_WORDS = ("linear", "mamba", "conv", "ssm", "recurrent", "delta", "kda", "gdn")


def _layer_kinds(config: Any) -> str:
    """The non-attention layer kinds a hybrid config lists (layer_types, layers_block_type ...)."""
    kinds: list[str] = []
    for key in ("layer_types", "layers_block_type", "block_types"):
        val = getattr(config, key, None)
        if isinstance(val, (list, tuple)):
            kinds += [str(v) for v in val if any(w in str(v) for w in RECURRENT_WORDS) and str(v) not in kinds]
    return ", ".join(kinds)


class _ComplexWatch(TorchFunctionMode):
    """Notes the first torch function that returns a complex tensor (DeepSeek-V2's rotary embedding)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = ""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if not self.seen and isinstance(out, torch.Tensor) and out.is_complex():
            self.seen = getattr(func, "__name__", str(func))
        return out


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:160]}" if text else type(e).__name__


def check_cache(hf: nn.Module) -> None:
    """Raise UnsupportedModelError unless two tokens run without complex tensors and leave a cache of
    same-shape key/value tensors."""
    config: Any = getattr(hf, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return  # Switch: the seq2seq lowering has its own cache handling
    cls = type(hf).__name__
    kwargs = {"output_router_logits": False} if hasattr(config, "output_router_logits") else {}
    watch = _ComplexWatch()
    try:
        with torch.no_grad(), watch:
            out = hf(input_ids=torch.ones(1, 2, dtype=torch.long), use_cache=True, **kwargs)
    except Exception as e:
        raise UnsupportedModelError(f"{cls}: a forward with use_cache=True fails ({_first_line(e)})") from e
    if watch.seen:
        raise UnsupportedModelError(
            f"{cls}: complex-valued tensors in its forward ({watch.seen}; rotary embeddings as complex numbers), "
            "which the ONNX exporter does not translate"
        )
    cache = getattr(out, "past_key_values", None)
    layers = getattr(cache, "layers", None)
    if not layers:
        what = type(cache).__name__ if cache is not None else "no cache"
        raise UnsupportedModelError(
            f"{cls}: its cache ({what}) has no per-layer key/value tensors; hybrid state-space / "
            "linear-attention caches are not lowered yet"
        )
    if type(cache).__name__ != "DynamicCache":
        kinds = _layer_kinds(config)
        raise UnsupportedModelError(
            f"{cls}: {'hybrid model (' + kinds + ' layers) with ' if kinds else ''}a cache class of its own "
            f"({type(cache).__name__}); the lowering carries a DynamicCache of key/value tensors only"
        )
    odd = sorted({type(layer).__name__ for layer in layers} - set(KV_LAYERS))
    if odd:
        what = "; ".join(f"{name} ({CACHE_FEATURES.get(name, 'not a key/value attention cache')})" for name in odd)
        kinds = _layer_kinds(config)
        raise UnsupportedModelError(
            f"{cls}: {'hybrid model (' + kinds + ' layers), ' if kinds else ''}cache layers {what} are not lowered "
            "yet; the lowering carries key/value attention caches only"
        )
    shapes = sorted({(tuple(la.keys.shape[1:2]) + tuple(la.keys.shape[3:]),
                      tuple(la.values.shape[1:2]) + tuple(la.values.shape[3:])) for la in layers})
    if len(shapes) > 1:
        raise UnsupportedModelError(
            f"{cls}: attention layers cache keys/values of different (heads, dim) shapes {shapes}; the lowering "
            "takes one shape for every layer"
        )
