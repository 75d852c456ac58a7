"""MoEModel: a transformers host model whose MoE blocks are canonical MoELayers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeopt.ir.layer import MoELayer
from moeopt.ir.predictor import RoutingPredictor
from moeopt.ir.table import QuantizedMatrix


@dataclass
class ParamStats:
    """Parameter counts and bytes, split the way an edge deployment cares about."""

    expert: int  # routed experts, as stored (physical slots)
    expert_active: int  # routed expert parameters a token touches (top_k slots)
    shared: int
    router: int
    non_expert: int  # everything else: embeddings, attention, norms, dense MLPs, lm_head
    expert_bytes: int
    non_expert_bytes: int

    @property
    def total(self) -> int:
        return self.expert + self.shared + self.router + self.non_expert

    @property
    def active(self) -> int:
        return self.expert_active + self.shared + self.router + self.non_expert


@dataclass
class MoEModel:
    """The IR: `hf` is the host model (runs with transformers as usual), `layers` its MoE layers in order.

    Attributes:
        source: where it came from (a path or a class name), for manifests and reproducers.
        source_dir: the checkpoint folder when loaded from disk (tokenizer files are taken from it).
        history: the pipelines that have run on it, oldest first.
        linears: packed form of the quantized non-expert linears, by module path in `hf` (their nn.Linear
            weights hold the dequantized values; see `moeopt.quant.linears`).
    """

    hf: nn.Module
    layers: list[MoELayer]
    source: str = ""
    source_dir: Path | None = None
    history: list[str] = field(default_factory=list)
    adapters: dict[str, str] = field(default_factory=dict)  # source block class -> adapter name
    storage_dtype: str = "float32"  # dtype on disk: a float16 checkpoint is saved as float16 again
    predictor: RoutingPredictor | None = None  # once the `predictor` pass has run
    plan: dict[str, Any] | None = None  # the `plan` pass's budget plan (JSON-able; see moeopt.passes.plan)
    linears: dict[str, QuantizedMatrix] = field(default_factory=dict)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.hf(*args, **kwargs)

    @property
    def config(self) -> Any:
        return self.hf.config

    @property
    def architecture(self) -> str:
        return str(getattr(self.hf.config, "model_type", type(self.hf).__name__))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, V) logits, no cache (decoder-only models)."""
        with torch.no_grad():
            out = self.hf(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits  # type: ignore[no-any-return]

    def stats(self, float_bytes: int | None = None) -> ParamStats:
        fb = float_bytes or torch.finfo(self.dtype).bits // 8
        expert = active = shared = router = 0
        expert_bytes = 0
        moe_ids: set[int] = set()
        for layer in self.layers:
            t = layer.table
            per_slot = t.w_in[0].numel() + t.w_out[0].numel() if t.num_slots else 0
            per_slot += (t.b_in[0].numel() + t.b_out[0].numel()) if t.b_in is not None and t.b_out is not None else 0
            expert += per_slot * t.num_slots
            active += per_slot * layer.router.top_k
            shared += sum(p.numel() for p in layer.shared.parameters())
            router += layer.router_weight.numel() + (0 if layer.router_bias is None else layer.router_bias.numel())
            expert_bytes += t.expert_bytes(fb)
            moe_ids.update(id(p) for p in layer.parameters())
        non_expert = sum(p.numel() for p in _unique_params(self.hf) if id(p) not in moe_ids)
        return ParamStats(
            expert=expert, expert_active=active, shared=shared, router=router, non_expert=non_expert,
            expert_bytes=expert_bytes, non_expert_bytes=(non_expert + shared + router) * fb,
        )

    def save(self, path: str | Path, *, dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
        """Write a moeopt checkpoint folder atomically (see `moeopt.ir.checkpoint`).

        An existing non-empty folder is refused unless `overwrite`, and then only one moeopt wrote.
        """
        from moeopt.ir.checkpoint import save_checkpoint

        return save_checkpoint(self, Path(path), dtype=dtype, overwrite=overwrite)

    def summary(self) -> str:
        """A short multi-line description: architecture, layers, experts, parameters."""
        s = self.stats()
        lines = [
            f"{type(self.hf).__name__} ({self.architecture}) from {self.source}",
            f"  MoE layers: {len(self.layers)}; parameters {s.total:,} (active/token {s.active:,})",
            f"  routed experts {s.expert:,} params, {s.expert_bytes / 2**20:.2f} MiB; "
            f"non-expert {s.non_expert + s.shared + s.router:,} params, {s.non_expert_bytes / 2**20:.2f} MiB",
        ]
        lines += [f"  [{layer.index}] {layer.path}: {layer.extra_repr()}" for layer in self.layers]
        if self.history:
            lines.append("  history: " + " | ".join(self.history))
        return "\n".join(lines)


def _unique_params(m: nn.Module) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in m.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out
