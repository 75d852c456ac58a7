"""Attention emitted as one `com.microsoft.GroupQueryAttention` node per layer (artifact `"attention": "gqa"`).

The exported graph of a transformers attention block is ~60 nodes per layer: rotary as Slice / Neg /
Concat / Mul, the cache as a Concat that copies the whole past every step, K/V repeated per query head
with Expand, a mask built from the attention mask, and matmul + softmax. ORT's GroupQueryAttention does
all of it in one kernel (rotary from a cos/sin cache, the causal mask from `seqlens_k`, GQA without
repeating K/V) and, when the runtime binds the same buffer as past and present, writes the new key and
value in place: no concat growth, no copy of the cache per step.

Why emit rather than rewrite the exported graph: the attention subgraph torch.export produces changes
with the architecture and the transformers version (mask helpers, rotary variants, SDPA decomposition),
so a pattern over it would be brittle; the attention module's own attributes (heads, head_dim,
scaling, rotary embedding) say exactly what the node needs. As the MoE layers do (`moeopt::moe_layer`),
the module's forward calls an opaque `moeopt::gqa_attention` op during export and the translation
emits the node. The q/k/v/o projections stay ordinary nn.Linear -> MatMul with a 2-D weight, so graph
rewrites of linears (MatMulNBits quantization) see them as before.

Only what was verified goes this way (`gqa_unsupported` says why not otherwise): the attention of
Mixtral, Qwen2-MoE (q/k/v biases), Qwen3-MoE (per-head q/k RMSNorm) and OLMoE (q/k RMSNorm over the
projection) - q/k/v/o projections, rotary over the whole head with a static cos/sin table, no sliding
window, sinks or softcap - with head_dim a multiple of 16 (ORT's CPU kernel requires it), in resident
decoder-only artifacts; and gpt-oss, whose attention sinks (one logit per head in the softmax's
denominator) and sliding-window layers map onto the node's `head_sink` input and `local_window_size`
(`moeopt::gqa_attention_sinks`; its YaRN rotary is a static table too). Offload artifacts keep the
exported attention.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import torch
from onnx.defs import OpSchema
from onnxscript import FLOAT, INT64, values
from torch import nn

from moeopt.lower.onnx_routing import const_i, op

OP_NAME = "moeopt::gqa_attention"
ATTENTION_KINDS = ("auto", "gqa", "export")
SUPPORTED_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss")
# cos/sin do not depend on the sequence length (YaRN's frequencies and attention factor are fixed at init)
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")
# Types whose sinks and sliding windows go to GroupQueryAttention's head_sink / local_window_size.
SINKS_AND_WINDOWS = ("gpt_oss",)
SINKS_OP_NAME = "moeopt::gqa_attention_sinks"


@torch.library.custom_op(OP_NAME, mutates_args=())
def gqa_attention(
    q: torch.Tensor,  # (B, T, Hq * D), before rotary
    k: torch.Tensor,  # (B, T, Hkv * D), before rotary
    v: torch.Tensor,  # (B, T, Hkv * D)
    attention_mask: torch.Tensor,  # (B, P + T), 1 = real token; only right padding (as GroupQueryAttention)
    past_k: torch.Tensor,  # (B, Hkv, P, D), rotated
    past_v: torch.Tensor,
    cos_cache: torch.Tensor,  # (max_positions, D / 2)
    sin_cache: torch.Tensor,
    config: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference semantics of the node (eager; export only uses the fake): (out (B, T, Hq*D), present k, v)."""
    c = json.loads(config)
    b, t, p = q.shape[0], q.shape[1], past_k.shape[2]
    hq, d, rep = c["num_heads"], c["head_dim"], c["num_heads"] // c["kv_num_heads"]
    qh, kh, vh = _rotated(q, k, v, attention_mask, past_k, past_v, cos_cache, sin_cache, c)
    scores = qh @ kh.repeat_interleave(rep, 1).transpose(-1, -2) * c["scale"]  # (B, Hq, T, P + T)
    causal = torch.ones(t, p + t, dtype=torch.bool).tril(p)
    scores = scores.masked_fill(~causal, float("-inf"))
    out = scores.softmax(-1) @ vh.repeat_interleave(rep, 1)
    return out.transpose(1, 2).reshape(b, t, hq * d), kh, vh


def _rotated(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor, past_k: torch.Tensor,
    past_v: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor, c: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both reference ops' inputs as heads: (rotated q (B, Hq, T, D), present k (B, Hkv, P + T, D), present v)."""
    hq, hkv, d = c["num_heads"], c["kv_num_heads"], c["head_dim"]
    b, t, _ = q.shape
    lens = attention_mask.sum(-1)  # (B,) real tokens so far, new ones included
    pos = (lens[:, None] - t + torch.arange(t)[None]).clamp(min=0)  # (B, T)

    def rope(x: torch.Tensor) -> torch.Tensor:  # (B, H, T, D)
        cos, sin = cos_cache[pos][:, None], sin_cache[pos][:, None]  # (B, 1, T, D/2)
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    qh = rope(q.view(b, t, hq, d).transpose(1, 2))
    kh = torch.cat([past_k, rope(k.view(b, t, hkv, d).transpose(1, 2))], dim=2)
    vh = torch.cat([past_v, v.view(b, t, hkv, d).transpose(1, 2)], dim=2)
    return qh, kh, vh


@gqa_attention.register_fake
def _gqa_fake(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor, past_k: torch.Tensor,
    past_v: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor, config: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, t = q.shape[0], q.shape[1]
    shape = (b, past_k.shape[1], past_k.shape[2] + t, past_k.shape[3])
    return torch.empty_like(q), past_k.new_empty(shape), past_v.new_empty(shape)


def _gqa_schema() -> OpSchema:
    """The contrib op's schema as far as the exporter needs it (onnx's registry does not know it)."""
    fp, opt = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    attr, at = OpSchema.Attribute, OpSchema.AttrType
    inputs = [fp("query", "T"), fp("key", "T", param_option=opt), fp("value", "T", param_option=opt),
              fp("past_key", "T", param_option=opt), fp("past_value", "T", param_option=opt),
              fp("seqlens_k", "M"), fp("total_sequence_length", "M"),
              fp("cos_cache", "T", param_option=opt), fp("sin_cache", "T", param_option=opt)]
    outputs = [fp("output", "T"), fp("present_key", "T"), fp("present_value", "T")]
    attrs = [attr("num_heads", at.INT, ""), attr("kv_num_heads", at.INT, ""), attr("scale", at.FLOAT, ""),
             attr("do_rotary", at.INT, ""), attr("rotary_interleaved", at.INT, "")]
    return OpSchema("GroupQueryAttention", "com.microsoft", 1, doc="", inputs=inputs, outputs=outputs,
                    type_constraints=[("T", ["tensor(float)"], ""), ("M", ["tensor(int32)"], "")],
                    attributes=attrs)


_GQA = values.Op(values.Opset("com.microsoft", 1), "GroupQueryAttention", _gqa_schema())
_INT32 = 6  # onnx.TensorProto.INT32


def gqa_attention_onnx(
    q: FLOAT, k: FLOAT, v: FLOAT, attention_mask: INT64, past_k: FLOAT, past_v: FLOAT, cos_cache: FLOAT,
    sin_cache: FLOAT, config: str,
) -> tuple[FLOAT, FLOAT, FLOAT]:
    """One GroupQueryAttention node; seqlens_k / total_sequence_length from the (B, P + T) mask."""
    c = json.loads(config)
    seqlens = op.Cast(op.Sub(op.ReduceSum(attention_mask, const_i(-1), keepdims=0), op.Constant(value_int=1)),
                      to=_INT32)  # (B,) index of each row's last real token
    total = op.Cast(op.Squeeze(op.Shape(attention_mask, start=1, end=2), const_i(0)), to=_INT32)  # scalar
    out, present_k, present_v = _GQA(
        q, k, v, past_k, past_v, seqlens, total, cos_cache, sin_cache, num_heads=c["num_heads"],
        kv_num_heads=c["kv_num_heads"], scale=float(c["scale"]), do_rotary=1, rotary_interleaved=0, _outputs=3,
    )
    return out, present_k, present_v


def translation_table() -> dict[Any, Any]:
    return {torch.ops.moeopt.gqa_attention.default: gqa_attention_onnx,
            torch.ops.moeopt.gqa_attention_sinks.default: gqa_attention_sinks_onnx}


# --- attention sinks and sliding windows (gpt-oss) ------------------------------------------------------


def local_window_size(sliding_window: int | None) -> int:
    """GroupQueryAttention's `local_window_size` for a transformers `sliding_window` (None: full attention).

    Both let a query see the keys with `q - kv < window` (itself and window - 1 before it): measured on ORT
    1.32's CPU kernel against transformers' gpt-oss, where window - 1 moves the logits from the first
    position past the window on (tests/test_gpt_oss.py).
    """
    return -1 if not sliding_window else int(sliding_window)


@torch.library.custom_op(SINKS_OP_NAME, mutates_args=())
def gqa_attention_sinks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor, past_k: torch.Tensor,
    past_v: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
    sinks: torch.Tensor,  # (Hq,): one logit per head that takes part in the softmax and is then dropped
    config: str,  # as gqa_attention's, plus "local_window_size" (-1: full attention; else q - kv < it)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference semantics of the node with head_sink and local_window_size (eager; export uses the fake)."""
    c = json.loads(config)
    b, t, p = q.shape[0], q.shape[1], past_k.shape[2]
    hq, d, rep = c["num_heads"], c["head_dim"], c["num_heads"] // c["kv_num_heads"]
    window = int(c["local_window_size"])
    qh, kh, vh = _rotated(q, k, v, attention_mask, past_k, past_v, cos_cache, sin_cache, c)
    scores = qh @ kh.repeat_interleave(rep, 1).transpose(-1, -2) * c["scale"]
    gap = (p + torch.arange(t))[:, None] - torch.arange(p + t)[None]  # query position - key position
    allowed = (gap >= 0) & ((gap < window) if window >= 0 else True)
    scores = scores.masked_fill(~allowed, float("-inf"))
    sink = sinks.reshape(1, hq, 1, 1).expand(b, hq, t, 1).to(scores.dtype)
    probs = torch.cat([scores, sink], dim=-1).softmax(-1)[..., :-1]
    out = probs @ vh.repeat_interleave(rep, 1)
    return out.transpose(1, 2).reshape(b, t, hq * d), kh, vh


@gqa_attention_sinks.register_fake
def _gqa_sinks_fake(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor, past_k: torch.Tensor,
    past_v: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor, sinks: torch.Tensor, config: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _gqa_fake(q, k, v, attention_mask, past_k, past_v, cos_cache, sin_cache, config)


def _gqa_sinks_schema() -> OpSchema:
    """The contrib op's schema up to head_sink, with local_window_size (see `_gqa_schema`)."""
    fp, opt = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    base = _gqa_schema()
    inputs = [*base.inputs, fp("position_ids", "I", param_option=opt), fp("attention_bias", "T", param_option=opt),
              fp("head_sink", "T", param_option=opt)]
    attrs = [*base.attributes.values(), OpSchema.Attribute("local_window_size", OpSchema.AttrType.INT, "")]
    return OpSchema("GroupQueryAttention", "com.microsoft", 1, doc="", inputs=inputs, outputs=list(base.outputs),
                    type_constraints=[("T", ["tensor(float)"], ""), ("M", ["tensor(int32)"], ""),
                                      ("I", ["tensor(int64)"], "")], attributes=attrs)


_GQA_SINKS = values.Op(values.Opset("com.microsoft", 1), "GroupQueryAttention", _gqa_sinks_schema())


def gqa_attention_sinks_onnx(
    q: FLOAT, k: FLOAT, v: FLOAT, attention_mask: INT64, past_k: FLOAT, past_v: FLOAT, cos_cache: FLOAT,
    sin_cache: FLOAT, sinks: FLOAT, config: str,
) -> tuple[FLOAT, FLOAT, FLOAT]:
    """One GroupQueryAttention node with head_sink and local_window_size (see `gqa_attention_onnx`)."""
    c = json.loads(config)
    seqlens = op.Cast(op.Sub(op.ReduceSum(attention_mask, const_i(-1), keepdims=0), op.Constant(value_int=1)),
                      to=_INT32)
    total = op.Cast(op.Squeeze(op.Shape(attention_mask, start=1, end=2), const_i(0)), to=_INT32)
    out, present_k, present_v = _GQA_SINKS(
        q, k, v, past_k, past_v, seqlens, total, cos_cache, sin_cache, None, None, sinks,
        num_heads=c["num_heads"], kv_num_heads=c["kv_num_heads"], scale=float(c["scale"]), do_rotary=1,
        rotary_interleaved=0, local_window_size=int(c["local_window_size"]), _outputs=3,
    )
    return out, present_k, present_v


def _decoder_layers(hf: nn.Module) -> list[nn.Module]:
    base = getattr(hf, "model", None)
    layers = getattr(base, "layers", None)
    return list(layers) if isinstance(layers, nn.ModuleList) else []


def gqa_unsupported(hf: nn.Module) -> str | None:
    """Why the model's attention cannot be emitted as GroupQueryAttention (None: it can)."""
    cfg = hf.config
    model_type = str(getattr(cfg, "model_type", ""))
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"{model_type}: GroupQueryAttention lowering is verified for {', '.join(SUPPORTED_MODEL_TYPES)} only"
    layers = _decoder_layers(hf)
    rotary = getattr(getattr(hf, "model", None), "rotary_emb", None)
    if not layers or rotary is None:
        return f"{model_type}: no model.layers / model.rotary_emb"
    if getattr(rotary, "rope_type", "default") not in _STATIC_ROPE:
        return f"rope type {rotary.rope_type} depends on the sequence length"
    if getattr(cfg, "attn_logit_softcapping", None):
        return "soft-capped attention"
    windows = model_type in SINKS_AND_WINDOWS
    if not windows and (any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or []) or (
            getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True))):
        return "sliding-window attention"
    for layer in layers:
        att = getattr(layer, "self_attn", None)
        if att is None or not all(isinstance(getattr(att, n, None), nn.Linear)
                                  for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return "attention without q/k/v/o projections"
        if not windows and (hasattr(att, "sinks") or getattr(att, "sliding_window", None)):
            return "attention with sinks or a sliding window"
        d = int(att.head_dim)
        if d % 16:
            return f"head_dim {d} is not a multiple of 16 (ORT's CPU GroupQueryAttention requires it)"
    return None


def rotary_cache(hf: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(max_positions, head_dim / 2) cos and sin, from the model's own rotary module (scaling included)."""
    rotary: Any = hf.model.rotary_emb  # type: ignore[union-attr]
    n = int(getattr(hf.config, "max_position_embeddings", 0) or 4096)
    pos = torch.arange(n)[None]
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), pos)  # (1, n, D): halves repeated
    # halves repeated (D wide), or each frequency once (D / 2 wide: gpt-oss): the first D / 2 columns either way
    att: Any = _decoder_layers(hf)[0].self_attn
    half = int(att.head_dim) // 2
    return cos[0, :, :half].float().contiguous(), sin[0, :, :half].float().contiguous()


class _MaskHolder:
    mask: torch.Tensor | None = None


@contextlib.contextmanager
def attention_as_ops(hf: nn.Module) -> Iterator[_MaskHolder]:
    """Inside, every decoder layer's self_attn.forward calls `moeopt::gqa_attention`.

    Yields the holder the export wrapper sets the raw (B, P + T) attention mask on before each forward
    (the attention modules only see transformers' processed mask). The model is restored on exit.
    """
    holder = _MaskHolder()
    base: Any = hf.model
    cos, sin = rotary_cache(hf)
    base.register_buffer("moeopt_rotary_cos", cos, persistent=False)
    base.register_buffer("moeopt_rotary_sin", sin, persistent=False)
    patched = []
    for idx, layer in enumerate(_decoder_layers(hf)):
        att: Any = layer.self_attn
        spec = {"num_heads": int(att.config.num_attention_heads), "kv_num_heads": int(att.config.num_key_value_heads),
                "head_dim": int(att.head_dim), "scale": float(att.scaling)}
        if hasattr(att, "sinks"):
            spec["local_window_size"] = local_window_size(getattr(att, "sliding_window", None))
        cfg = json.dumps(spec)
        att.forward = _forward(att, idx, cfg, base, holder)  # instance attribute: shadows the class method
        patched.append(att)
    try:
        yield holder
    finally:
        for att in patched:
            del att.forward
        del base.moeopt_rotary_cos, base.moeopt_rotary_sin


def _qk_norm(norm: Any, x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Qwen3-MoE normalises each head (weight of head_dim), OLMoE the whole projection."""
    if norm.weight.numel() == head_dim:
        return norm(x.view(*x.shape[:-1], -1, head_dim)).view(x.shape)  # type: ignore[no-any-return]
    return norm(x)  # type: ignore[no-any-return]


def _forward(att: Any, idx: int, config: str, base: Any, holder: _MaskHolder) -> Any:
    def forward(hidden_states: torch.Tensor, *args: Any, past_key_values: Any = None, **kwargs: Any) -> Any:
        if holder.mask is None or past_key_values is None:
            raise RuntimeError("the GroupQueryAttention export needs the attention mask and a cache")
        cache_layer = past_key_values.layers[idx]
        q, k = att.q_proj(hidden_states), att.k_proj(hidden_states)
        if hasattr(att, "q_norm"):  # before rotary, as the architectures that have them apply them
            q, k = _qk_norm(att.q_norm, q, att.head_dim), _qk_norm(att.k_norm, k, att.head_dim)
        if hasattr(att, "sinks"):
            out, k, v = torch.ops.moeopt.gqa_attention_sinks(
                q, k, att.v_proj(hidden_states), holder.mask, cache_layer.keys, cache_layer.values,
                base.moeopt_rotary_cos, base.moeopt_rotary_sin, att.sinks, config,
            )
        else:
            out, k, v = torch.ops.moeopt.gqa_attention(
                q, k, att.v_proj(hidden_states), holder.mask, cache_layer.keys, cache_layer.values,
                base.moeopt_rotary_cos, base.moeopt_rotary_sin, config,
            )
        cache_layer.keys, cache_layer.values = k, v
        return att.o_proj(out), None

    return forward
