"""OLMoE: softmax top-k, renormalised when norm_topk_prob (False in the released model)."""

from typing import Any

from torch import nn

from moeopt.ir.adapters.base import Adapter, RouterParts
from moeopt.ir.spec import RouterSpec


def _spec(block: nn.Module, router: RouterParts, config: Any, e: int) -> RouterSpec:
    return RouterSpec(
        num_experts=e, top_k=config.num_experts_per_tok, score_fn="softmax",
        norm="sum" if config.norm_topk_prob else "none",
    )


ADAPTER = Adapter("olmoe", ("OlmoeSparseMoeBlock",), _spec, doc="softmax top-k")
