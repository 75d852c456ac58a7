"""The IR verifier: invariants that must hold after every pass. Errors name layer, expert and invariant."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moeopt.errors import VerificationError
from moeopt.ir.layer import MoELayer
from moeopt.ir.model import MoEModel


@dataclass(frozen=True)
class Problem:
    layer: int
    expert: int | None  # original expert id, or slot id where `slot` says so
    invariant: str
    detail: str

    def __str__(self) -> str:
        where = f"layer {self.layer}" + ("" if self.expert is None else f", expert {self.expert}")
        return f"{where}: {self.invariant}: {self.detail}"


def check_layer(layer: MoELayer) -> list[Problem]:
    """Every broken invariant of one layer (empty list = valid)."""
    i, r, t = layer.index, layer.router, layer.table
    out: list[Problem] = []

    def bad(inv: str, detail: str, expert: int | None = None) -> None:
        out.append(Problem(i, expert, inv, detail))

    e, h = r.num_experts, t.spec.hidden
    if tuple(layer.router_weight.shape) != (e, h):
        bad("router-width", f"router weight is {tuple(layer.router_weight.shape)}, "
            f"expected ({e}, {h}) = (original experts, hidden)")
    if t.num_experts != e or t.keep_mask.shape != (e,) or t.slot_of.shape != (e,):
        bad("router-width", f"expert table covers {t.num_experts} experts (keep_mask {tuple(t.keep_mask.shape)}, "
            f"slot_of {tuple(t.slot_of.shape)}) but the router has {e}")
        return out
    s = t.num_slots
    if tuple(t.w_in.shape) != (s, t.spec.in_rows, h) or tuple(t.w_out.shape) != (s, h, t.spec.intermediate):
        bad("slot-shapes", f"w_in {tuple(t.w_in.shape)} / w_out {tuple(t.w_out.shape)} do not match "
            f"{s} slots of ({t.spec.in_rows}, {h}) / ({h}, {t.spec.intermediate})")
    if len(t.slots) != s:
        bad("slot-shapes", f"{len(t.slots)} slot records for {s} weight slots")
    used: set[int] = set()
    for x in range(e):
        kept, slot = bool(t.keep_mask[x]), int(t.slot_of[x])
        if kept and not 0 <= slot < s:
            bad("dangling-slot", f"kept expert maps to slot {slot}, but only slots 0..{s - 1} exist", x)
        elif not kept and slot != -1:
            bad("pruned-slot", f"pruned expert still maps to slot {slot}", x)
        elif kept:
            used.add(slot)
            if x not in t.slots[slot].members:
                bad("slot-members", f"routes to slot {slot} whose members are {t.slots[slot].members}", x)
    for slot in range(s):
        if slot not in used:
            bad("orphan-slot", f"slot {slot} receives no kept expert")
    kept_n = int(t.keep_mask.sum())
    if kept_n < r.top_k:
        bad("top-k", f"top_k={r.top_k} but only {kept_n} experts are kept")
    for slot, info in enumerate(t.slots[:s]):
        if info.bits is None:
            continue
        for name in ("w_in", "w_out"):
            key = f"{slot}_{name}"
            q: Any = t.quantized[key] if key in t.quantized else None  # noqa: SIM401 (ModuleDict has no .get)
            if q is None or q.scales is None or q.scales.numel() == 0:
                detail = f"slot {slot} is {info.bits}-bit but {name} has no scales"
                out.append(Problem(i, slot, "missing-scale", detail))
            elif q.bits != info.bits:
                out.append(Problem(i, slot, "bitwidth", f"slot {slot} says {info.bits} bits, {name} holds {q.bits}"))
    if r.has_score_bias != (layer.score_bias is not None):
        bad("score-bias", f"router spec has_score_bias={r.has_score_bias} but bias tensor is "
            f"{'present' if layer.score_bias is not None else 'absent'}")
    if not torch.isfinite(layer.router_weight).all():
        bad("finite", "router weight has inf/nan")
    return out


def check(model: MoEModel) -> list[Problem]:
    """Every broken invariant of the model."""
    problems = [p for layer in model.layers for p in check_layer(layer)]
    for n, layer in enumerate(model.layers):
        if layer.index != n:
            problems.append(Problem(n, None, "layer-index", f"layer at position {n} says index {layer.index}"))
    return problems


def verify(model: MoEModel) -> None:
    """Raise VerificationError naming the first broken invariant (and how many more there are)."""
    problems = check(model)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise VerificationError(f"{problems[0]}{more}")
