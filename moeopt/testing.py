"""Tiny random-weight models of every supported architecture, built from a fixed seed.

Used by the tests and as a stand-in where a real checkpoint is not needed; each builds in milliseconds.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# arch -> (config class name, model class name, config overrides)
_COMMON: dict[str, Any] = {
    "vocab_size": 97,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}
TINY: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {"intermediate_size": 48, "num_local_experts": 4, "num_experts_per_tok": 2},
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {
            "intermediate_size": 48,
            "moe_intermediate_size": 24,
            "shared_expert_intermediate_size": 40,
            "num_experts": 6,
            "num_experts_per_tok": 2,
            "norm_topk_prob": False,
            "decoder_sparse_step": 1,
        },
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {
            "intermediate_size": 48,
            "moe_intermediate_size": 24,
            "num_experts": 6,
            "num_experts_per_tok": 2,
            "norm_topk_prob": True,
            "head_dim": 8,
            "decoder_sparse_step": 1,
        },
    ),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {"intermediate_size": 24, "num_experts": 6, "num_experts_per_tok": 2}),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        {
            "intermediate_size": 48,
            "moe_intermediate_size": 16,
            "n_routed_experts": 8,
            "num_experts_per_tok": 2,
            "n_shared_experts": 1,
            "n_group": 4,
            "topk_group": 2,
            "first_k_dense_replace": 1,
            "num_hidden_layers": 3,
            "q_lora_rank": 16,
            "kv_lora_rank": 16,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 8,
            "routed_scaling_factor": 2.5,
            "num_key_value_heads": 4,
        },
    ),
    "phimoe": (
        "PhimoeConfig",
        "PhimoeForCausalLM",
        {"intermediate_size": 24, "num_local_experts": 4, "num_experts_per_tok": 2},
    ),
    "switch_transformers": (
        "SwitchTransformersConfig",
        "SwitchTransformersForConditionalGeneration",
        {
            "vocab_size": 97,
            "d_model": 32,
            "d_kv": 8,
            "d_ff": 48,
            "num_layers": 2,
            "num_decoder_layers": 2,
            "num_heads": 4,
            "num_experts": 4,
            "expert_capacity": 64,
            "encoder_sparse_step": 1,
            "decoder_sparse_step": 1,
            "decoder_start_token_id": 0,
            "pad_token_id": 0,
            "eos_token_id": 1,
        },
    ),
    # swiglu_limit 2 (7 as shipped) so tiny random experts reach the clamp; sliding_window 4 so short
    # prompts cross it. Hidden and intermediate are whole MXFP4 blocks (32) for `write_mxfp4_checkpoint`.
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        {
            "intermediate_size": 32,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "head_dim": 8,
            "sliding_window": 4,
            "swiglu_limit": 2.0,
            "rope_parameters": {  # gpt-oss's YaRN, scaled to the tiny context (128 = 32 x 4)
                "rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                "truncate": False, "original_max_position_embeddings": 4,
            },
        },
    ),
    # Not listed by name in moeopt: loaded through structure detection with no per-model code.
    "granitemoe": (
        "GraniteMoeConfig",
        "GraniteMoeForCausalLM",
        {"intermediate_size": 24, "num_local_experts": 4, "num_experts_per_tok": 2},
    ),
    "ernie4_5_moe": (
        "Ernie4_5_MoeConfig",
        "Ernie4_5_MoeForCausalLM",
        {
            "intermediate_size": 48,
            "moe_intermediate_size": 24,
            "moe_num_experts": 6,
            "moe_k": 2,
            "moe_num_shared_experts": 1,
            "moe_layer_start_index": 0,
            "moe_layer_interval": 1,
        },
    ),
    "glm4_moe": (
        "Glm4MoeConfig",
        "Glm4MoeForCausalLM",
        {
            "intermediate_size": 48,
            "moe_intermediate_size": 16,
            "n_routed_experts": 8,
            "num_experts_per_tok": 2,
            "n_shared_experts": 1,
            "n_group": 2,
            "topk_group": 1,
            "first_k_dense_replace": 0,
            "head_dim": 8,
            "routed_scaling_factor": 1.5,
        },
    ),
    "hunyuan_v1_moe": (
        "HunYuanMoEV1Config",
        "HunYuanMoEV1ForCausalLM",
        {"intermediate_size": 24, "num_experts": 4, "moe_topk": 2, "head_dim": 8},
    ),
    "dots1": (
        "Dots1Config",
        "Dots1ForCausalLM",
        {
            "intermediate_size": 48,
            "moe_intermediate_size": 16,
            "n_routed_experts": 8,
            "num_experts_per_tok": 2,
            "n_shared_experts": 1,
            "n_group": 2,
            "topk_group": 1,
            "first_k_dense_replace": 0,
            "head_dim": 8,
            "routed_scaling_factor": 1.0,
        },
    ),
    # AFMoE: sigmoid router with a score bias on the block, route_scale, shared experts, gated attention.
    "afmoe": (
        "AfmoeConfig",
        "AfmoeForCausalLM",
        {
            "intermediate_size": 48,
            "moe_intermediate_size": 16,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "num_shared_experts": 1,
            "num_dense_layers": 0,
            "head_dim": 8,
            "route_scale": 2.0,
            "global_attn_every_n_layers": 2,
        },
    ),
}
LISTED = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "phimoe", "switch_transformers", "gpt_oss")
DETECTED = ("granitemoe", "ernie4_5_moe", "glm4_moe", "hunyuan_v1_moe", "dots1", "afmoe")


def tiny_config(arch: str) -> Any:
    import transformers

    cfg_name, _, over = TINY[arch]
    kw = dict(_COMMON) if arch != "switch_transformers" else {}
    kw.update(over)
    return getattr(transformers, cfg_name)(**kw)


def tiny_model(arch: str, seed: int = 0) -> nn.Module:
    """A tiny randomly initialised transformers model of `arch`, in eval mode, float32."""
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, TINY[arch][1])(tiny_config(arch))
    # Routers of some architectures initialise to zero (all experts tie); give them real preferences.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and any(
                k in name for k in ("gate.weight", "router.weight", "classifier.weight", "wg.weight")
            ):
                p.normal_(0.0, 0.5)
            elif "e_score_correction_bias" in name or "moe_statics" in name or "expert_bias" in name:
                p.normal_(0.0, 0.1)
            elif arch == "gpt_oss" and ".experts." in name:  # biases init to 0 and weights too small to clamp
                p.normal_(0.0, 0.5 if name.endswith("gate_up_proj") else 0.2)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0.0, 0.1)
    return model.float().eval()
