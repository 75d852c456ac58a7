"""Split a dense Llama into an exactly equivalent Mixtral: every FFN becomes E experts, all of them active.

Why: quantizers must be judged on real pretrained weights, and the real MoEs are too large for this
machine. A dense SwiGLU FFN is a sum over its neurons, so cutting its `intermediate_size` neurons into E
contiguous slices gives E experts whose outputs add up to the dense FFN. Mixtral's router (transformers
5.23, `MixtralTopKRouter`) takes softmax(router logits), keeps the top k and renormalises them to sum 1;
with zero router weights, k = E and every token, each expert's weight is exactly 1/E, so each expert's
down projection is scaled by E. Attention, norms, embeddings and rotary embeddings are the same modules
in Llama and Mixtral, so they are copied unchanged. The result is not a trained MoE: dropping any expert
loses part of every token's FFN.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moeopt.errors import BadInputError, UnsupportedModelError

# Llama config fields Mixtral reads with the same meaning (copied as they are).
_SHARED_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "rope_parameters",
    "attention_dropout",
)


def check_splittable(config: Any, experts: int) -> None:
    """Refuse a source whose features Mixtral cannot express, or an FFN that E does not divide.

    Raises:
        UnsupportedModelError: not a Llama, or biases / tensor-parallel slicing Mixtral has no slot for.
        BadInputError: E < 1 or `intermediate_size` not divisible by E.
    """
    if getattr(config, "model_type", None) != "llama":
        raise UnsupportedModelError(f"can split only a Llama into experts, got model_type "
                                    f"'{getattr(config, 'model_type', None)}'")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise UnsupportedModelError(f"the source Llama has {flag}=True; Mixtral has no bias there")
    if int(getattr(config, "pretraining_tp", 1) or 1) != 1:
        raise UnsupportedModelError("the source Llama has pretraining_tp > 1; Mixtral computes no such slices")
    ffn = int(config.intermediate_size)
    if experts < 1 or ffn % experts:
        raise BadInputError(f"cannot split an FFN of {ffn} neurons into {experts} equal experts: "
                            f"choose a number of experts that divides {ffn}")


def mixtral_config(config: Any, experts: int) -> Any:
    """The MixtralConfig of the split: the Llama's fields, FFN/E neurons per expert, all E experts active."""
    from transformers import MixtralConfig

    check_splittable(config, experts)
    fields = {k: getattr(config, k) for k in _SHARED_FIELDS if hasattr(config, k)}
    if fields.get("head_dim") is None:
        fields["head_dim"] = config.hidden_size // config.num_attention_heads
    return MixtralConfig(
        **fields, intermediate_size=config.intermediate_size // experts, num_local_experts=experts,
        num_experts_per_tok=experts, sliding_window=None, router_jitter_noise=0.0, output_router_logits=False,
        architectures=["MixtralForCausalLM"],
    )


def split_state_dict(state: dict[str, torch.Tensor], num_layers: int, experts: int) -> dict[str, torch.Tensor]:
    """Map a Llama state dict onto Mixtral's keys, each FFN cut into `experts` neuron slices.

    Expert e holds neurons [e*f, (e+1)*f) of gate/up (fused as Mixtral's `gate_up_proj`, gate first) and
    the matching columns of down, times E (the router gives each expert 1/E).
    """
    out = dict(state)
    for i in range(num_layers):
        pre = f"model.layers.{i}.mlp."
        gate, up, down = (out.pop(pre + f"{n}_proj.weight") for n in ("gate", "up", "down"))
        f = gate.shape[0] // experts
        gate_up = torch.stack([torch.cat([gate[e * f:(e + 1) * f], up[e * f:(e + 1) * f]]) for e in range(experts)])
        downs = torch.stack([down[:, e * f:(e + 1) * f] * experts for e in range(experts)])
        out[pre + "experts.gate_up_proj"] = gate_up.contiguous()
        out[pre + "experts.down_proj"] = downs.contiguous()
        out[pre + "gate.weight"] = torch.zeros(experts, gate.shape[1], dtype=gate.dtype)
    return out


def split_llama(dense: nn.Module, experts: int = 8) -> Any:
    """A MixtralForCausalLM (fp32, eval) whose logits equal `dense`'s: see the module docstring.

    Raises:
        UnsupportedModelError / BadInputError: see `check_splittable`.
    """
    from transformers import MixtralForCausalLM

    config: Any = dense.config
    moe_config = mixtral_config(config, experts)
    state = {k: v.detach().float() for k, v in dense.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    state = split_state_dict(state, int(config.num_hidden_layers), experts)
    moe = MixtralForCausalLM(moe_config).float()
    result = moe.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not (moe_config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        what = (missing or result.unexpected_keys)[0]
        raise UnsupportedModelError(f"the split Llama does not map onto Mixtral: tensor '{what}' "
                                    f"{'missing' if missing else 'unexpected'}")
    if moe_config.tie_word_embeddings:
        moe.tie_weights()
    moe.eval()
    return moe
