"""Blocks that cannot be mapped are refused with the block class and what was not understood."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moeopt


class _OddExpert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.Linear(8, 8)
        self.beta = nn.Linear(8, 8)


class _OddMoE(nn.Module):
    """Has an `experts` child, but its experts use projection names no architecture uses."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(8, 4, bias=False)
        self.experts = nn.ModuleList([_OddExpert() for _ in range(4)])


class _Host(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block


def test_unmappable_block_names_class_and_reason() -> None:
    with pytest.raises(
        moeopt.UnsupportedModelError, match=r"_OddMoE at 'block' has an `experts` child but no recognisable"
    ):
        moeopt.load(_Host(_OddMoE()))


class _WrongRouter(nn.Module):
    """Structure of an MoE block, but its forward does something the IR cannot express (top-k by |logit|)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.models.mixtral.modeling_mixtral import MixtralConfig, MixtralExperts

        cfg = MixtralConfig(hidden_size=8, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)
        self.gate = nn.Linear(8, 4, bias=False)
        self.experts = MixtralExperts(cfg)
        nn.init.normal_(self.experts.gate_up_proj)
        nn.init.normal_(self.experts.down_proj)
        self.top_k = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        logits = self.gate(flat)
        idx = logits.abs().topk(2, dim=-1).indices
        w = torch.softmax(logits.gather(1, idx), dim=-1)
        return self.experts(flat, idx, w).reshape(x.shape)  # type: ignore[no-any-return]


def test_block_whose_semantics_cannot_be_reproduced() -> None:
    block = _WrongRouter()
    nn.init.normal_(block.gate.weight, std=2.0)
    with pytest.raises(
        moeopt.UnsupportedModelError,
        match=r"_WrongRouter at 'block': canonical MoE layer with any of \d+ router semantics",
    ):
        moeopt.load(_Host(block))


def test_unsupported_input_type() -> None:
    with pytest.raises(moeopt.BadInputError, match="cannot load a int"):
        moeopt.load(3)  # type: ignore[arg-type]


def test_unknown_custom_gate_is_refused_naming_it() -> None:
    """gpt-oss's own gate is supported (tests/test_gpt_oss.py); a different `_apply_gate` is refused."""
    import transformers
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    class OtherGateExperts(GptOssExperts):
        def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
            return gate_up[..., ::2] * gate_up[..., 1::2]

    cfg = transformers.GptOssConfig(
        vocab_size=97, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
        layer_types=["full_attention"] * 2,
    )
    hf = transformers.GptOssForCausalLM(cfg)
    hf.model.layers[1].mlp.experts.__class__ = OtherGateExperts
    with pytest.raises(moeopt.UnsupportedModelError, match=r"OtherGateExperts: custom gating function `_apply_gate`"):
        moeopt.load(hf)
