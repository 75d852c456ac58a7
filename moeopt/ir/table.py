"""ExpertTable: the routed experts of one layer, with the maps from original experts to physical slots.

Weights are stored stacked per slot (`w_in[s]`, `w_out[s]`) because every consumer (the reference
forward, the ONNX MoE ops, quantization) wants them that way; `expert(s)` gives one slot's tensors.
After quantization the float tensors hold the DEQUANTIZED values (the reference numerics) and
`quantized` holds the packed integer form that the lowering emits.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import nn

from moeopt.ir.spec import ExpertSpec

ExpertState = Literal["kept", "pruned", "merged"]


@dataclass(frozen=True)
class SlotInfo:
    """Metadata of one physical slot.

    members: the original expert ids whose routing lands here; members[0] is the slot's own expert,
    the others were merged into it. bits: None for float weights. importance: from the last analysis.
    """

    members: tuple[int, ...]
    bits: int | None = None
    importance: float | None = None

    def __post_init__(self) -> None:
        if not self.members:
            raise ValueError("a slot needs at least one member expert")
        if len(set(self.members)) != len(self.members):
            raise ValueError(f"duplicate members in slot {self.members}")
        if self.bits is not None and self.bits not in (2, 3, 4, 8):
            raise ValueError(f"bits must be one of 2, 3, 4, 8 or None, got {self.bits}")

    def to_dict(self) -> dict[str, Any]:
        return {"members": list(self.members), "bits": self.bits, "importance": self.importance}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SlotInfo:
        return cls(members=tuple(d["members"]), bits=d.get("bits"), importance=d.get("importance"))


class QuantizedMatrix(nn.Module):
    """Group-wise integer form of one (rows, cols) expert matrix, in ONNX Runtime's block layout.

    packed: uint8 (rows, cols // group * group * bits / 8); scales: (rows, cols // group);
    zero_points: uint8 or None for symmetric quantization.
    """

    def __init__(
        self, rows: int, cols: int, bits: int, group_size: int, symmetric: bool, packed: torch.Tensor,
        scales: torch.Tensor, zero_points: torch.Tensor | None,
    ) -> None:
        super().__init__()
        self.rows, self.cols, self.bits, self.group_size, self.symmetric = rows, cols, bits, group_size, symmetric
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        self.register_buffer("zero_points", zero_points)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        # A checkpoint builds these with placeholder (meta) buffers before it knows the packed shapes;
        # take the saved shapes so load_state_dict(assign=True) accepts them.
        for name in ("packed", "scales", "zero_points"):
            saved, current = state_dict.get(prefix + name), getattr(self, name)
            if saved is not None and current is not None and current.is_meta:
                setattr(self, name, torch.empty_like(saved, device="meta"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def meta(self) -> dict[str, Any]:
        return {
            "rows": self.rows, "cols": self.cols, "bits": self.bits, "group_size": self.group_size,
            "symmetric": self.symmetric, "has_zero_points": self.zero_points is not None,
        }


class ExpertTable(nn.Module):
    """Routed experts of one layer: stacked slot weights + keep_mask[E] + slot_of[E]."""

    keep_mask: torch.Tensor
    slot_of: torch.Tensor

    def __init__(
        self,
        spec: ExpertSpec,
        num_experts: int,
        w_in: torch.Tensor,  # (S, F, H), F = 2I (GLU: gate rows then up rows) or I
        w_out: torch.Tensor,  # (S, H, I)
        b_in: torch.Tensor | None = None,  # (S, F)
        b_out: torch.Tensor | None = None,  # (S, H)
        slots: list[SlotInfo] | None = None,
        keep_mask: torch.Tensor | None = None,
        slot_of: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.num_experts = num_experts
        self.w_in = nn.Parameter(w_in, requires_grad=False)
        self.w_out = nn.Parameter(w_out, requires_grad=False)
        self.b_in = None if b_in is None else nn.Parameter(b_in, requires_grad=False)
        self.b_out = None if b_out is None else nn.Parameter(b_out, requires_grad=False)
        n_slots = w_in.shape[0]
        self.slots: list[SlotInfo] = slots if slots is not None else [SlotInfo((s,)) for s in range(n_slots)]
        if keep_mask is None:
            keep_mask = torch.ones(num_experts, dtype=torch.bool)
        if slot_of is None:
            slot_of = torch.full((num_experts,), -1, dtype=torch.int64)
            for s, info in enumerate(self.slots):
                for e in info.members:
                    slot_of[e] = s
        self.register_buffer("keep_mask", keep_mask)
        self.register_buffer("slot_of", slot_of)
        self.quantized = nn.ModuleDict()  # "{slot}_w_in" / "{slot}_w_out" -> QuantizedMatrix

    @property
    def num_slots(self) -> int:
        return int(self.w_in.shape[0])

    def state(self, expert: int) -> ExpertState:
        """kept (owns its slot), pruned (never routed), or merged (routed into another expert's slot)."""
        if not bool(self.keep_mask[expert]):
            return "pruned"
        s = int(self.slot_of[expert])
        return "kept" if self.slots[s].members[0] == expert else "merged"

    def expert(self, slot: int) -> dict[str, torch.Tensor]:
        """One slot's tensors as separate matrices: gate/up/down for GLU experts, in/down otherwise."""
        inter = self.spec.intermediate
        out: dict[str, torch.Tensor] = {"down": self.w_out[slot]}
        if self.spec.glu:
            out["gate"], out["up"] = self.w_in[slot, :inter], self.w_in[slot, inter:]
        else:
            out["in"] = self.w_in[slot]
        return out

    def set_slots(
        self,
        w_in: torch.Tensor,
        w_out: torch.Tensor,
        slots: list[SlotInfo],
        b_in: torch.Tensor | None = None,
        b_out: torch.Tensor | None = None,
    ) -> None:
        """Replace the physical slots (after pruning/merging) and rebuild keep_mask/slot_of from members."""
        self.w_in = nn.Parameter(w_in.contiguous(), requires_grad=False)
        self.w_out = nn.Parameter(w_out.contiguous(), requires_grad=False)
        self.b_in = None if b_in is None else nn.Parameter(b_in.contiguous(), requires_grad=False)
        self.b_out = None if b_out is None else nn.Parameter(b_out.contiguous(), requires_grad=False)
        self.slots = list(slots)
        keep = torch.zeros(self.num_experts, dtype=torch.bool)
        slot_of = torch.full((self.num_experts,), -1, dtype=torch.int64)
        for s, info in enumerate(self.slots):
            for e in info.members:
                keep[e] = True
                slot_of[e] = s
        self.keep_mask, self.slot_of = keep, slot_of
        self.quantized = nn.ModuleDict()

    def select_slots(self, keep: list[int], slots: list[SlotInfo] | None = None) -> None:
        """Keep only these physical slots (in this order); their experts' routing follows, others are pruned.

        Packed (quantized) weights move with their slot. `slots` optionally replaces the kept slots' records
        (e.g. with merged members).
        """
        idx = torch.tensor(keep, dtype=torch.long)
        old_q = dict(self.quantized.items())
        self.set_slots(
            self.w_in[idx], self.w_out[idx], slots if slots is not None else [self.slots[s] for s in keep],
            None if self.b_in is None else self.b_in[idx], None if self.b_out is None else self.b_out[idx],
        )
        for new, old in enumerate(keep):
            for name in ("w_in", "w_out"):
                if f"{old}_{name}" in old_q:
                    self.quantized[f"{new}_{name}"] = old_q[f"{old}_{name}"]

    def with_slot_info(self, slot: int, **changes: Any) -> None:
        self.slots[slot] = replace(self.slots[slot], **changes)

    def expert_bytes(self, float_bytes: int = 2) -> int:
        """Bytes of the routed experts as stored: quantized slots at their bitwidth, others at float_bytes."""
        total = 0
        per_slot_float = (self.w_in[0].numel() + self.w_out[0].numel()) if self.num_slots else 0
        for s, info in enumerate(self.slots):
            if info.bits is None:
                total += per_slot_float * float_bytes
            else:
                for name in ("w_in", "w_out"):
                    q: Any = self.quantized[f"{s}_{name}"]
                    total += q.packed.numel() + q.scales.numel() * q.scales.element_size()
                    total += 0 if q.zero_points is None else q.zero_points.numel()
        return total

    def meta(self) -> dict[str, Any]:
        return {
            "num_experts": self.num_experts,
            "spec": self.spec.to_dict(),
            "slots": [s.to_dict() for s in self.slots],
            "has_bias": self.b_in is not None,
            "quantized": {k: q.meta() for k, q in self.quantized.items()},  # type: ignore[operator]
        }
