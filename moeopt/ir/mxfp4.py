"""MXFP4 expert weights as gpt-oss checkpoints ship them, and a writer of such checkpoints for tests.

A shipped gpt-oss checkpoint stores each layer's experts as `gate_up_proj_blocks` (E, 2I, H/32, 16) /
`gate_up_proj_scales` (E, 2I, H/32) and `down_proj_blocks` (E, H, I/32, 16) / `down_proj_scales`
(E, H, I/32), with `quantization_config.quant_method = "mxfp4"` in config.json. Every 32 consecutive
input-dim values share one power-of-two scale (a uint8 biased exponent, 2**(s - 127)) and are each one
E2M1 code (two per byte, the even element in the low nibble). Rows are the output features, so the float
parameter is the transpose: gate_up_proj (E, H, 2I), down_proj (E, I, H).

moeopt dequantizes these on load (transformers' Mxfp4Config(dequantize=True)): the IR holds float
experts, which the `quantize` pass and the lowering treat like any other (ORT's CPU QMoE has no MXFP4).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

# E2M1 code -> value (transformers.integrations.mxfp4.FP4_VALUES)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32  # values per shared scale
PROJS = ("gate_up_proj", "down_proj")


def is_mxfp4_config(config: dict[str, Any]) -> bool:
    """Whether a config.json dict declares MXFP4-quantized weights."""
    q = config.get("quantization_config") or {}
    return isinstance(q, dict) and q.get("quant_method") == "mxfp4"


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., K) float -> blocks uint8 (..., K/32, 16), scales uint8 (..., K/32): round to nearest E2M1.

    The shared exponent is the smallest that fits the block's largest magnitude under 6 (E2M1's largest).
    """
    *lead, k = w.shape
    if k % BLOCK:
        raise ValueError(f"MXFP4 needs the input dimension to be whole blocks of {BLOCK}, got {k}")
    x = w.detach().float().reshape(*lead, k // BLOCK, BLOCK)
    amax = x.abs().amax(dim=-1, keepdim=True)
    exp = torch.ceil(torch.log2(torch.clamp(amax, min=2.0**-126) / 6.0)).clamp(-127, 127)
    lut = torch.tensor(FP4_VALUES[:8])  # magnitudes of codes 0..7
    y = (x / torch.exp2(exp)).abs()
    mag = (y[..., None] - lut).abs().argmin(dim=-1)  # (..., G, 32) nearest magnitude code
    codes = (mag | ((x < 0) & (mag > 0)).to(torch.int64) << 3).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    scales = (exp.squeeze(-1) + 127).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """blocks (..., G, 16), scales (..., G) -> (..., G * 32) values, as transformers decodes them."""
    lut = torch.tensor(FP4_VALUES, dtype=dtype)
    lo, hi = lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]
    vals = torch.stack([lo, hi], dim=-1).flatten(-2)  # (..., G, 32)
    vals = torch.ldexp(vals, (scales.to(torch.int32) - 127)[..., None].to(dtype))
    return vals.flatten(-2)


def quantize_param(name: str, p: torch.Tensor) -> dict[str, torch.Tensor]:
    """One fused expert parameter ((E, H, 2I) gate_up_proj or (E, I, H) down_proj) as shipped tensors."""
    blocks, scales = quantize(p.transpose(1, 2))  # rows = output features, K = input dim
    return {f"{name}_blocks": blocks, f"{name}_scales": scales}


def dequantize_param(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float parameter ((E, in, out), as GptOssExperts holds it) of shipped blocks / scales."""
    return dequantize(blocks, scales, dtype).transpose(1, 2).contiguous()


def write_mxfp4_checkpoint(hf: nn.Module, folder: str | Path) -> nn.Module:
    """Save a gpt-oss model as a shipped checkpoint: experts MXFP4, everything else float32.

    Returns:
        The reference: a copy of `hf` whose expert weights are the dequantized MXFP4 values (what a
        loader that dequantizes must reproduce exactly).
    """
    import copy

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config: Any = hf.config
    config.save_pretrained(folder)
    state: dict[str, torch.Tensor] = {}
    ref = copy.deepcopy(hf)
    ref_params = dict(ref.named_parameters())
    for name, p in hf.state_dict().items():
        stem, _, leaf = name.rpartition(".")
        if stem.endswith(".experts") and leaf in PROJS:
            packed = quantize_param(name, p)
            state.update(packed)
            with torch.no_grad():
                ref_params[name].copy_(dequantize_param(packed[f"{name}_blocks"], packed[f"{name}_scales"], p.dtype))
        else:
            state[name] = p.detach().contiguous()
    tied = getattr(hf, "_tied_weights_keys", None) or {}
    if getattr(config, "tie_word_embeddings", False):
        for key in tied:
            state.pop(key, None)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                                   "lm_head"],
    }
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return ref.eval()
