"""PhiMoE: sparsemixer routing (top-2 chosen one at a time with a jitter threshold), eval semantics."""

from typing import Any

from torch import nn

from moeopt.ir.adapters.base import Adapter, RouterParts
from moeopt.ir.spec import RouterSpec


def _spec(block: nn.Module, router: RouterParts, config: Any, e: int) -> RouterSpec:
    return RouterSpec(
        num_experts=e, top_k=2, score_fn="sparsemixer", jitter_eps=float(config.router_jitter_noise),
        logits_fp32=False,
    )


ADAPTER = Adapter("phimoe", ("PhimoeSparseMoeBlock",), _spec, doc="sparsemixer top-2")
