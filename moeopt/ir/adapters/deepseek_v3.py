"""DeepSeek-V3: sigmoid scores, score-correction bias for the choice only, group-limited top-k,
weights renormalised (+1e-20) and scaled by routed_scaling_factor, shared experts; the first
`first_k_dense_replace` layers are dense and stay as they are."""

from typing import Any

from torch import nn

from moeopt.ir.adapters.base import Adapter, RouterParts
from moeopt.ir.spec import RouterSpec


def _spec(block: nn.Module, router: RouterParts, config: Any, e: int) -> RouterSpec:
    return RouterSpec(
        num_experts=e, top_k=config.num_experts_per_tok, score_fn="sigmoid",
        norm="sum_eps" if config.norm_topk_prob else "none", norm_eps=1e-20,
        scale=float(config.routed_scaling_factor), has_score_bias=router.score_bias is not None,
        n_group=int(config.n_group or 1), topk_group=int(config.topk_group or 1) if (config.n_group or 1) > 1 else 1,
        sorted_topk=False,
    )


ADAPTER = Adapter(
    "deepseek_v3", ("DeepseekV3MoE",), _spec, doc="sigmoid, group-limited top-k, bias, scaling, shared experts"
)
