"""The decoder as an export-friendly module: flat past key/values in, logits and flat present out.

transformers 5 passes the KV cache as a `DynamicCache` object, which neither torch.export's inputs nor
ONNX can carry. This wrapper takes one key and one value tensor per layer, builds the cache inside
forward (so export traces its updates as concatenations) and returns the updated tensors flat.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache


@dataclass(frozen=True)
class CacheLayout:
    """Shapes of the per-layer cache tensors: (batch, heads, past, dim) for keys and values."""

    num_layers: int
    key_heads: int
    key_dim: int
    value_heads: int
    value_dim: int

    def input_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    def output_names(self) -> list[str]:
        return [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    def empty(self, batch: int, past: int = 0, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        """Zero-filled past tensors in input order (past=0: the first step of a generation)."""
        out = []
        for _ in range(self.num_layers):
            out.append(torch.zeros(batch, self.key_heads, past, self.key_dim, dtype=dtype))
            out.append(torch.zeros(batch, self.value_heads, past, self.value_dim, dtype=dtype))
        return out


def no_router_outputs(hf: nn.Module) -> dict[str, Any]:
    """Forward kwargs that switch off router-logit outputs.

    A config with output_router_logits=True (as training leaves it) makes the forward compute the
    load-balancing loss from the original router modules, which MoELayer replaced: nothing to collect,
    and transformers fails on the empty tuple.
    """
    return {"output_router_logits": False} if hasattr(getattr(hf, "config", None), "output_router_logits") else {}


def probe_cache_layout(hf: nn.Module) -> CacheLayout:
    """Run two tokens through the model and read the cache it builds (works for MLA, GQA, any head dims)."""
    with torch.no_grad():
        out = hf(input_ids=torch.ones(1, 2, dtype=torch.long), use_cache=True, **no_router_outputs(hf))
    cache = out.past_key_values
    layers = cache.layers
    k, v = layers[0].keys, layers[0].values
    if any(layer.keys.shape[1:] != k.shape[1:] or layer.values.shape[1:] != v.shape[1:] for layer in layers):
        raise ValueError("layers with different cache shapes are not supported by the lowering yet")
    return CacheLayout(len(layers), int(k.shape[1]), int(k.shape[3]), int(v.shape[1]), int(v.shape[3]))


class DecoderWithCache(nn.Module):
    """(input_ids, attention_mask, position_ids, *past) -> (logits, *present)."""

    def __init__(self, hf: nn.Module, layout: CacheLayout) -> None:
        super().__init__()
        self.hf = hf
        self.layout = layout
        self.mask_holder: Any = None  # lower.attention.attention_as_ops: hands it the raw mask

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor,  # (B, P + T): 1 = real token, 0 = padding
        position_ids: torch.Tensor,  # (B, T)
        *past: torch.Tensor,  # 2L tensors: (B, Hk, P, Dk), (B, Hv, P, Dv) per layer
    ) -> tuple[torch.Tensor, ...]:
        if self.mask_holder is not None:
            self.mask_holder.mask = attention_mask
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.layout.num_layers)]
        cache = DynamicCache(ddp_cache_data=pairs)
        out = self.hf(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=cache, use_cache=True, **no_router_outputs(self.hf),
        )
        present: list[torch.Tensor] = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


class DecoderNoCache(nn.Module):
    """(input_ids, attention_mask, position_ids) -> logits, for graphs without a cache."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
    ) -> torch.Tensor:
        out = self.hf(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
            **no_router_outputs(self.hf),
        )
        return out.logits  # type: ignore[no-any-return]
