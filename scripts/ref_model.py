"""Model configurations of the reference MoE (Mixtral) and its dense baseline (Mistral).

The dense baseline has the MoE's active parameters per token: same layers, width and attention, and
an MLP as wide as the ``top_k`` experts a token passes through.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM, PreTrainedModel

EOT_ID = 0  # <|endoftext|> is the tokenizer's only special token, so it gets id 0.


@dataclass(frozen=True)
class Shape:
    """Size of the reference model.

    Attributes:
        vocab: Vocabulary size (the tokenizer's).
        hidden: Model width.
        layers: Decoder layers.
        heads: Attention heads (no grouped-query attention: as many KV heads).
        expert_inter: Intermediate width of one expert's GLU MLP.
        experts: Routed experts per layer.
        top_k: Experts per token.
        max_pos: Maximum positions (RoPE).
    """

    vocab: int = 8192
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    expert_inter: int = 320
    experts: int = 8
    top_k: int = 2
    max_pos: int = 512


def _common(shape: Shape) -> dict[str, object]:
    return {
        "vocab_size": shape.vocab,
        "hidden_size": shape.hidden,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.heads,
        "head_dim": shape.hidden // shape.heads,
        "max_position_embeddings": shape.max_pos,
        # A short context needs no long-range RoPE base; 1e4 keeps nearby positions well separated.
        "rope_theta": 10000.0,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "bos_token_id": EOT_ID,
        "eos_token_id": EOT_ID,
        "pad_token_id": EOT_ID,
        "initializer_range": 0.02,
    }


def moe_config(shape: Shape, aux_coef: float = 0.01) -> MixtralConfig:
    """Mixtral config: ``experts`` GLU experts per layer, softmax top-k routing, load-balancing loss."""
    return MixtralConfig(
        **_common(shape),
        intermediate_size=shape.expert_inter,
        num_local_experts=shape.experts,
        num_experts_per_tok=shape.top_k,
        output_router_logits=True,
        router_aux_loss_coef=aux_coef,
        router_jitter_noise=0.0,
    )


def dense_config(shape: Shape) -> MistralConfig:
    """Mistral config with the MoE's active parameters (MLP width ``top_k * expert_inter``)."""
    return MistralConfig(**_common(shape), intermediate_size=shape.top_k * shape.expert_inter)


def build(arch: str, shape: Shape, experts_impl: str = "grouped_mm") -> PreTrainedModel:
    """A freshly initialised model (seed the RNG before calling) in fp32."""
    if arch == "moe":
        return MixtralForCausalLM._from_config(
            moe_config(shape), attn_implementation="sdpa", experts_implementation=experts_impl
        )
    if arch == "dense":
        return MistralForCausalLM._from_config(dense_config(shape), attn_implementation="sdpa")
    raise ValueError(f"arch must be moe or dense, got {arch!r}")


def param_counts(model: PreTrainedModel) -> dict[str, int]:
    """Total, expert and non-expert parameters, and parameters active per token.

    Tied embeddings count once. For an MoE, a token uses ``top_k / experts`` of each layer's experts;
    the router, attention, norms and embeddings are always active.
    """
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    n_exp = getattr(cfg, "num_local_experts", 0)
    active = total - expert + (expert * cfg.num_experts_per_tok // n_exp if n_exp else 0)
    embed = model.get_input_embeddings().weight.numel()
    return {
        "total": total,
        "expert": expert,
        "non_expert": total - expert,
        "active_per_token": active,
        "embedding": embed,
        "active_non_embedding": active - embed,
    }


def shape_dict(shape: Shape) -> dict[str, int]:
    """The shape as a plain dict for logs."""
    return asdict(shape)


def count_for_dtype(model: PreTrainedModel, dtype: torch.dtype = torch.float16) -> int:
    """Bytes the weights take in ``dtype`` (tied weights once)."""
    return sum(p.numel() for p in model.parameters()) * torch.finfo(dtype).bits // 8
