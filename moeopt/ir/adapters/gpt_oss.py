"""gpt-oss: a router linear with bias, top-k of the logits then a softmax over the chosen ones; fused
experts with biases, gate/up columns interleaved, and the clamped SwiGLU `(up + 1) * gate *
sigmoid(alpha * gate)` with gate <= limit and up in [-limit, limit] (ExpertSpec's swiglu_* fields).

Checkpoints shipped with MXFP4 experts are dequantized to float by transformers on load (see
`moeopt.ir.mxfp4`), so the experts read here are always float tensors.
"""

from typing import Any

import torch
from torch import nn

from moeopt.errors import UnsupportedModelError
from moeopt.ir.adapters.base import Adapter, ExpertParts, RouterParts
from moeopt.ir.spec import ExpertSpec, RouterSpec


def _spec(block: nn.Module, router: RouterParts, config: Any, e: int) -> RouterSpec:
    return RouterSpec(
        num_experts=e, top_k=int(config.num_experts_per_tok), score_fn="topk_softmax", norm="none",
        has_bias=router.bias is not None, logits_fp32=False,  # F.linear in the model's dtype, as the source
    )


def _experts(ex: nn.Module, preferred_act: str | None) -> ExpertParts:
    """(E, H, 2I) interleaved gate_up_proj / (E, I, H) down_proj -> the canonical [gate; up] rows."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    if getattr(type(ex), "_apply_gate", None) is not GptOssExperts._apply_gate:
        raise UnsupportedModelError(f"{type(ex).__name__}: not gpt-oss's clamped SwiGLU gate")
    gate_up, down = getattr(ex, "gate_up_proj", None), getattr(ex, "down_proj", None)
    if not (isinstance(gate_up, torch.Tensor) and gate_up.is_floating_point() and isinstance(down, torch.Tensor)):
        raise UnsupportedModelError(
            f"{type(ex).__name__}: experts are not float tensors (MXFP4 kernels?); load the checkpoint "
            "dequantized (moeopt.load does)"
        )
    w_in = gate_up.detach().transpose(1, 2)  # (E, 2I, H), rows g0, u0, g1, u1, ...
    b_in: torch.Tensor = getattr(ex, "gate_up_proj_bias").detach()  # noqa: B009 (an nn.Module attribute)
    w_in = torch.cat([w_in[:, 0::2], w_in[:, 1::2]], dim=1)
    b_in = torch.cat([b_in[:, 0::2], b_in[:, 1::2]], dim=1)
    w_out = down.detach().transpose(1, 2)  # (E, H, I)
    spec = ExpertSpec(
        hidden=int(w_out.shape[1]), intermediate=int(w_out.shape[2]), act="silu", glu=True, bias=True,
        swiglu_alpha=float(ex.alpha), swiglu_beta=1.0, swiglu_limit=float(ex.limit),  # type: ignore[arg-type]
    )
    b_out: torch.Tensor = getattr(ex, "down_proj_bias").detach()  # noqa: B009
    return ExpertParts(spec, w_in.contiguous(), w_out.contiguous(), b_in.contiguous(), b_out.contiguous())


ADAPTER = Adapter(
    "gpt_oss", ("GptOssMLP",), _spec, doc="topk-softmax router with bias, clamped SwiGLU experts with biases",
    experts=_experts, tuple_output=True,
)
