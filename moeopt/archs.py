"""Every MoE causal-LM model type of the installed transformers, and a tiny random model of each.

Used by `scripts/arch_coverage.py` (the README's architecture table) and by the lowering tests. A type
counts when transformers maps it to a `...ForCausalLM` class and its (text) config names experts; types
that are aliases of one class (`llama4` / `llama4_text`) count once, under the type of the class's own
config. The tiny config takes the type's defaults and shrinks every size it knows by name (few layers,
hidden 32, vocab 97, 8 experts), so a new transformers release is covered without new code; `EXTRA`
holds the few per-type settings the generic shrinking cannot guess.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Config keys whose presence says "this model has experts".
EXPERT_KEYS = (
    "num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok",
    "num_experts_per_token", "moe_topk", "moe_k", "top_k_experts",
)
VOCAB = 97
LAYERS = 2

# Generic sizes, applied to every key the type's config has.
_SIZES: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 48, "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 24, "shared_experts_intermediate_size": 24, "shared_intermediate_size": 24,
    "moe_shared_expert_intermediate_size": 24, "expert_ffn_hidden_size": 16, "ffn_hidden_size": 48,
    "dense_intermediate_size": 48, "intermediate_size_mlp": 48,
    "num_experts": 8, "num_local_experts": 8, "n_routed_experts": 8, "moe_num_experts": 8,
    "num_experts_per_tok": 2, "num_experts_per_token": 2, "moe_topk": 2, "moe_k": 2, "top_k_experts": 2,
    "n_group": 2, "num_expert_group": 2, "topk_group": 1,
    "max_position_embeddings": 128, "model_max_length": 128,
    "q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
    "qk_head_dim": 16, "n_shared_experts": 1, "o_lora_rank": 16, "index_head_dim": 8, "index_n_heads": 2,
    "first_k_dense_replace": 0, "num_dense_layers": 0, "moe_layer_start_index": 0, "decoder_sparse_step": 1,
    "moe_layer_interval": 1, "interleave_moe_layer_step": 1, "expert_layer_period": 1, "expert_layer_offset": 0,
    "linear_num_key_heads": 2, "linear_num_value_heads": 2, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
    "linear_num_heads": 2, "linear_head_dim": 8, "linear_conv_kernel_dim": 4,
    "mamba_n_heads": 4, "mamba_num_heads": 4, "mamba_head_dim": 8, "mamba_d_head": 8, "mamba_d_state": 8,
    "ssm_state_size": 8, "mamba_n_groups": 1, "n_groups": 1, "mamba_chunk_size": 16, "chunk_size": 16,
    "mamba_dt_rank": 4, "swa_head_dim": 8, "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2,
    "kv_channels": 8, "router_hidden_size": 16, "tie_word_embeddings": False,
    "num_nextn_predict_layers": 0, "use_cache": True, "mlp_only_layers": [],
}
# Token ids the defaults put past the tiny vocabulary.
_TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

# Per-type settings on top of the generic ones (keys the generic shrinking cannot guess).
EXTRA: dict[str, dict[str, Any]] = {
    "granitemoehybrid": {"mamba_n_heads": 8, "layer_types": ["linear_attention", "attention"]},  # heads * dim = 2H
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "use_mamba_kernels": False},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "gemma4_text": {"enable_moe_block": True},
    "doge": {"is_moe": True, "num_experts": 16},
    "zaya": {"num_experts_per_tok": 1},  # ZAYA supports top-1 only
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 8, "indexer_budget": 16,
                       "indexer_compress_ratio": 4, "ngram_vocab_size_base": 256, "hc_lowrank": 8,
                       "ple_embed_dim": 32},
}


@dataclass(frozen=True)
class MoEType:
    """One MoE causal-LM model type: its config class and the causal-LM class transformers maps it to."""

    model_type: str
    config_class: str
    model_class: str


def _quiet() -> None:
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def _text_config(cfg: Any) -> Any:
    try:
        return cfg.get_text_config()
    except (ValueError, AttributeError):
        return cfg


def moe_types() -> list[MoEType]:
    """The MoE causal-LM types of the installed transformers, sorted by name."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    _quiet()
    by_class: dict[str, MoEType] = {}
    for mt, model_cls in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()):
        if not isinstance(model_cls, str) or not model_cls.endswith("ForCausalLM") or mt not in CONFIG_MAPPING_NAMES:
            continue
        try:
            cfg = transformers.CONFIG_MAPPING[mt]()
        except Exception:
            continue
        keys = _text_config(cfg).to_dict()
        if not any(k in keys for k in EXPERT_KEYS):
            continue
        cls = getattr(transformers, model_cls, None)
        own = getattr(cls, "config_class", None)
        entry = MoEType(mt, CONFIG_MAPPING_NAMES[mt], model_cls)
        prev = by_class.get(model_cls)
        # Aliases of one class (llama4 / llama4_text): keep the type whose config the class takes.
        if prev is None or (own is not None and own.__name__ == entry.config_class):
            by_class[model_cls] = entry
    return sorted(by_class.values(), key=lambda t: t.model_type)


def _per_layer(values: list[Any], n: int) -> list[Any]:
    """A per-layer list cut to `n` layers that keeps one layer of every kind the full list has."""
    kinds = list(dict.fromkeys(str(v) for v in values))
    if len(kinds) <= 1 or len(kinds) > 4:
        return list(values[:n])
    firsts = [values[[str(v) for v in values].index(k)] for k in kinds]
    return (firsts * n)[: max(n, len(firsts))]


def tiny_config(model_type: str, layers: int = LAYERS) -> Any:
    """The type's default config, shrunk: `layers` layers (more where the type has more layer kinds),
    hidden 32, vocabulary 97, 8 experts."""
    import transformers

    _quiet()
    cls = type(transformers.CONFIG_MAPPING[model_type]())
    defaults = cls().to_dict()
    kw: dict[str, Any] = {k: v for k, v in {**_SIZES, "num_hidden_layers": layers}.items() if k in defaults}
    kw.update({k: v for k, v in _TOKEN_IDS.items() if k in defaults and defaults[k] is not None})
    if defaults.get("num_key_value_heads") == defaults.get("num_attention_heads") and "num_attention_heads" in kw:
        kw["num_key_value_heads"] = kw["num_attention_heads"]  # MHA-only attention (MLA) stays MHA
    n = layers
    extra = EXTRA.get(model_type, {})
    n = int(extra.get("num_hidden_layers", n))
    per_layer: dict[str, list[Any]] = {}
    for key, val in defaults.items():  # per-layer lists (layer_types, mlp_layer_types ...)
        if isinstance(val, list) and len(val) == defaults.get("num_hidden_layers") and key not in kw:
            cut = _per_layer(val, n)
            if len(cut) <= 4:
                per_layer[key] = cut
    fixed = [len(v) for k, v in extra.items() if isinstance(v, list) and k in per_layer]
    total = max([n, *fixed, *(len(v) for v in per_layer.values())])
    for key, val in per_layer.items():  # every list as long as the longest (one layer of each kind)
        kw[key] = (val * total)[:total]
    if per_layer and "num_hidden_layers" in kw:
        kw["num_hidden_layers"] = total
    kw.update(extra)
    return cls(**kw)


def tiny_model(model_type: str, seed: int = 0, layers: int = LAYERS) -> nn.Module:
    """A tiny random model of the type, float32, eval mode, with routers that have real preferences."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(model_type, layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    spread_routers(model)
    return model.float().eval()


def spread_routers(model: nn.Module) -> None:
    """Random routers instead of transformers' initialisation (often zeros: every expert ties)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in [*model.named_parameters(), *model.named_buffers()]:
            leaf = name.rsplit(".", 2)
            if p.dim() == 2 and any(k in name for k in ("gate.weight", "router.weight", "classifier.weight",
                                                          "wg.weight", "router.proj.weight", "gate.linear.weight")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif p.dim() == 1 and ("e_score_correction_bias" in name or "expert_bias" in name
                                   or "moe_statics" in name or leaf[-1] == "score_bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
