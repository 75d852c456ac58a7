"""Mixtral: softmax over E experts, top-k, chosen weights renormalised to sum 1."""

from typing import Any

from torch import nn

from moeopt.ir.adapters.base import Adapter, RouterParts
from moeopt.ir.spec import RouterSpec


def _spec(block: nn.Module, router: RouterParts, config: Any, e: int) -> RouterSpec:
    return RouterSpec(num_experts=e, top_k=config.num_experts_per_tok, score_fn="softmax", norm="sum")


ADAPTER = Adapter("mixtral", ("MixtralSparseMoeBlock",), _spec, doc="softmax top-k, renormalised")
