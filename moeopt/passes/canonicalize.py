"""`canonicalize`: put every layer's slots in a canonical order (exact).

Slots are ordered by their smallest member expert, members within a slot keep their primary first and
the rest ascending, orphaned slots (no kept expert routes to them) are dropped. Two IRs that describe the
same compressed model then save to the same bytes, which makes outputs reproducible and diffable.
"""

from __future__ import annotations

from moeopt.ir.model import MoEModel
from moeopt.ir.table import SlotInfo
from moeopt.passes.base import ALL, Pass, PassContext, PassResult
from moeopt.passes.registry import register


@register
class Canonicalize(Pass):
    name = "canonicalize"
    kind = "transform"
    summary = "order slots by their smallest member expert and drop orphaned slots (exact)"
    exact = True

    def call(self, model: MoEModel, ctx: PassContext) -> PassResult:
        moved = dropped = 0
        for layer in model.layers:
            t = layer.table
            live = [s for s in range(t.num_slots)
                    if any(bool(t.keep_mask[e]) and int(t.slot_of[e]) == s for e in t.slots[s].members)]
            order = sorted(live, key=lambda s: min(t.slots[s].members))
            slots = []
            for s in order:
                info = t.slots[s]
                members = [e for e in info.members if bool(t.keep_mask[e]) and int(t.slot_of[e]) == s]
                primary = info.members[0] if info.members[0] in members else min(members)
                rest = sorted(m for m in members if m != primary)
                slots.append(SlotInfo((primary, *rest), info.bits, info.importance))
            if order == list(range(t.num_slots)) and all(a == b for a, b in zip(slots, t.slots, strict=True)):
                continue
            moved += sum(1 for i, s in enumerate(order) if i != s)
            dropped += t.num_slots - len(order)
            t.select_slots(order, slots)
        modified = bool(moved or dropped)
        # Routing over ORIGINAL experts is unchanged, so routing analyses stay valid; slot-indexed ones do not.
        preserved = ALL if not modified else frozenset({"routing-stats", "importance", "param-stats"})
        return PassResult(model, modified, preserved, {"slots-moved": moved, "slots-dropped": dropped})
