"""SwitchTransformers (encoder-decoder): top-1 softmax router (optionally with bias), ReLU MLP experts in
a ModuleDict, tokens past an expert's capacity within a sequence are dropped."""

from typing import Any

from torch import nn

from moeopt.ir.adapters.base import Adapter, RouterParts
from moeopt.ir.spec import RouterSpec


def _spec(block: nn.Module, router: RouterParts, config: Any, e: int) -> RouterSpec:
    return RouterSpec(
        num_experts=e, top_k=1, score_fn="softmax", norm="none", has_bias=router.bias is not None,
        capacity=int(config.expert_capacity),
    )


ADAPTER = Adapter("switch_transformers", ("SwitchTransformersSparseMLP",), _spec, doc="top-1 with capacity")
