"""`moeopt.trace`: the torch.export graph of an MoEModel with each MoE layer as ONE op node."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moeopt.ir.layer import layers_as_ops
from moeopt.ir.model import MoEModel

MOE_TARGET = "moeopt.moe_layer"


class _LogitsOnly(nn.Module):
    """Returns logits only and no cache, which is what torch.export handles for transformers models."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kw: Any) -> torch.Tensor:
        return self.hf(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kw).logits  # type: ignore[no-any-return]


def trace(
    model: MoEModel, example_inputs: dict[str, torch.Tensor] | torch.Tensor | None = None, *, dynamic: bool = False,
) -> torch.export.ExportedProgram:
    """Export the model; `moe_nodes(program)` lists the one node per MoE layer.

    Args:
        example_inputs: input_ids (B, T) or a dict of model inputs (input_ids, attention_mask,
            decoder_input_ids for encoder-decoder models); a (1, 8) batch of token 1 by default.
        dynamic: mark batch and sequence as dynamic dimensions.
    """
    if example_inputs is None:
        example_inputs = torch.ones(1, 8, dtype=torch.long)
    kwargs = {"input_ids": example_inputs} if isinstance(example_inputs, torch.Tensor) else dict(example_inputs)
    if getattr(model.config, "is_encoder_decoder", False):
        kwargs.setdefault("decoder_input_ids", kwargs["input_ids"])
        # Switch's encoder indexes the mask unconditionally under export: give it an all-ones one.
        kwargs.setdefault("attention_mask", torch.ones_like(kwargs["input_ids"]))
    shapes = None
    if dynamic:
        b, t = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=4096)
        shapes = {k: ({0: b, 1: t} if v.dim() == 2 else None) for k, v in kwargs.items()}
    with layers_as_ops(), torch.no_grad():
        return torch.export.export(_LogitsOnly(model.hf), (), kwargs, dynamic_shapes=shapes, strict=False)


def moe_nodes(program: torch.export.ExportedProgram) -> list[torch.fx.Node]:
    """The graph's MoE layer nodes, in execution order."""
    return [n for n in program.graph.nodes if n.op == "call_function" and MOE_TARGET in str(n.target)]
