"""MoE blocks of transformers whose computation the canonical MoE layer does not express.

Structure detection would find an experts container in most of them and then fail the probe with a
number; a user needs the feature instead. `moeopt.load` refuses these classes with the reason here.
"""

from __future__ import annotations

UNSUPPORTED: dict[str, str] = {
    "Llama4TextMoe": "the router's sigmoid score scales each expert's input, not its output (Llama 4)",
    "ZayaSparseMoeBlock": "the router is an MLP with a skip class and state carried across layers (ZAYA)",
    "InklingMoE": "the router has a shared-expert sink logit and a global scale (Inkling)",
    "LongcatFlashMoE": "zero-computation (identity) experts among the routed ones (LongCat-Flash)",
    "JetMoeMoE": "mixture-of-attention experts and ParallelExperts MLPs (JetMoE)",
    "JetMoeAttention": "mixture-of-attention experts (JetMoE)",
    "DogeCDMoE": "cross-domain MoE: experts retrieved by product keys from embedding tables (Doge)",
    "Gemma4TextDecoderLayer": "a router with its own norm, input scale and per-expert output scale, experts beside "
    "the dense MLP inside the decoder layer (Gemma 4)",
}


def unsupported_reason(block_class: str) -> str | None:
    """Why blocks of this class cannot be mapped onto the IR, or None when nothing is known."""
    return UNSUPPORTED.get(block_class)
