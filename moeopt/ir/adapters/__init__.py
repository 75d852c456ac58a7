"""Architecture adapters: one small module per Hugging Face MoE family, plus structural detection."""

from __future__ import annotations

from torch import nn

from moeopt.ir.adapters import deepseek_v3, gpt_oss, mixtral, olmoe, phimoe, qwen2_moe, qwen3_moe, switch
from moeopt.ir.adapters.base import Adapter, build_layer, looks_like_moe_block

ADAPTERS: tuple[Adapter, ...] = tuple(
    m.ADAPTER for m in (mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3, phimoe, switch, gpt_oss)
)
GENERIC = Adapter("generic", (), None, doc="structure detection; router semantics inferred by probing")
_BY_CLASS = {cls: a for a in ADAPTERS for cls in a.block_classes}


def adapter_for(block: nn.Module) -> Adapter | None:
    """The adapter of this block's class, the generic one for an unknown MoE-shaped block, else None."""
    named = _BY_CLASS.get(type(block).__name__)
    if named is not None:
        return named
    return GENERIC if looks_like_moe_block(block) else None


__all__ = ["ADAPTERS", "GENERIC", "Adapter", "adapter_for", "build_layer"]
