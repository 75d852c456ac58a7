"""Encoder-decoder models (SwitchTransformers) as two graphs: the encoder, and a decoder with a KV cache.

encoder.onnx: (input_ids, attention_mask) -> encoder_hidden_states.
decoder.onnx: (decoder_input_ids, encoder_hidden_states, attention_mask, past self-attention key/values)
-> (logits, present self-attention key/values). Cross-attention keys/values are recomputed from the
encoder states at every step (no cross cache): simpler graph, a little more compute per token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import MoEModelOutput

from moeopt.ir.model import MoEModel
from moeopt.lower.decoder import CacheLayout
from moeopt.lower.export import ExportedDecoder, onnx_export

ENCODER_FILE = "encoder.onnx"


class _Encoder(nn.Module):
    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        encoder: Any = self.hf.encoder
        return encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # type: ignore[no-any-return]


class _Decoder(nn.Module):
    def __init__(self, hf: nn.Module, layout: CacheLayout) -> None:
        super().__init__()
        self.hf, self.layout = hf, layout

    def forward(
        self,
        decoder_input_ids: torch.Tensor,  # (B, T)
        encoder_hidden_states: torch.Tensor,  # (B, S, H)
        attention_mask: torch.Tensor,  # (B, S) encoder padding mask
        *past: torch.Tensor,  # 2L self-attention tensors (B, heads, P, dim)
    ) -> tuple[torch.Tensor, ...]:
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.layout.num_layers)]
        cache = EncoderDecoderCache(DynamicCache(ddp_cache_data=pairs), DynamicCache())
        out = self.hf(
            encoder_outputs=MoEModelOutput(last_hidden_state=encoder_hidden_states), attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids, past_key_values=cache, use_cache=True,
        )
        present: list[torch.Tensor] = []
        for layer in out.past_key_values.self_attention_cache.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def probe_seq2seq_layout(hf: nn.Module) -> CacheLayout:
    ids = torch.ones(1, 3, dtype=torch.long)
    mask = torch.ones_like(ids)
    with torch.no_grad():  # encoder run apart: it refuses the use_cache flag a combined call hands it
        states = _Encoder(hf)(ids, mask)
        enc = MoEModelOutput(last_hidden_state=states)
        out = hf(encoder_outputs=enc, attention_mask=mask, decoder_input_ids=ids[:, :2], use_cache=True)
    layers = out.past_key_values.self_attention_cache.layers
    k, v = layers[0].keys, layers[0].values
    return CacheLayout(len(layers), int(k.shape[1]), int(k.shape[3]), int(v.shape[1]), int(v.shape[3]))


def export_seq2seq(model: MoEModel, folder: Path, decoder_file: str) -> tuple[ExportedDecoder, dict[str, Any]]:
    """Write the encoder and decoder graphs into `folder`; returns the decoder's description and the encoder's."""
    hf = model.hf.eval()
    layout = probe_seq2seq_layout(hf)
    b, s, t, p = 2, 5, 3, 4
    vocab = int(model.config.vocab_size)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, vocab, (b, s), generator=gen)
    mask = torch.ones(b, s, dtype=torch.long)
    dyn = torch.export.Dim.DYNAMIC
    two_d = {0: dyn, 1: dyn}
    enc_names = {"input_ids": {0: "batch", 1: "source_sequence"}, "attention_mask": {0: "batch", 1: "source_sequence"}}
    enc_stats = onnx_export(model, _Encoder(hf), (ids, mask), (two_d, two_d), ["input_ids", "attention_mask"],
                            ["encoder_hidden_states"], folder / ENCODER_FILE, enc_names)
    with torch.no_grad():
        states = _Encoder(hf)(ids, mask)
    dec_ids = torch.randint(2, vocab, (b, t), generator=gen)
    past = layout.empty(b, p)
    inputs = ["decoder_input_ids", "encoder_hidden_states", "attention_mask", *layout.input_names()]
    outputs = ["logits", *layout.output_names()]
    names: dict[str, dict[int, str]] = {
        "decoder_input_ids": {0: "batch", 1: "sequence"}, "encoder_hidden_states": {0: "batch", 1: "source_sequence"},
        "attention_mask": {0: "batch", 1: "source_sequence"},
    }
    names.update({n: {0: "batch", 2: "past_sequence"} for n in layout.input_names()})
    stats = onnx_export(
        model, _Decoder(hf, layout), (dec_ids, states, mask, *past),
        (two_d, {0: dyn, 1: dyn}, two_d, tuple({0: dyn, 2: dyn} for _ in past)), inputs, outputs,
        folder / decoder_file, names,
    )
    encoder = {
        "file": ENCODER_FILE, "inputs": ["input_ids", "attention_mask"], "outputs": ["encoder_hidden_states"],
        "moe_nodes": enc_stats[0], "dense_moe_layers": enc_stats[1],
        "decoder_start_token_id": int(getattr(model.config, "decoder_start_token_id", 0) or 0),
    }
    return ExportedDecoder(inputs, outputs, layout, stats[0], stats[1], stats[2]), encoder
