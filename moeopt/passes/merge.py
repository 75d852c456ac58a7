"""`merge`: fold each matched moderate expert into its hot expert.

The moderate expert's hidden neurons are first aligned to the hot expert's (a permutation found by
linear assignment with scipy, or by optimal transport with POT), then the two are averaged with
importance weights. Routing keeps the original router: slot_of sends the moderate expert's choices to
the merged slot, where they add to the hot expert's. `align=none` is the no-alignment baseline.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from moeopt import distributed
from moeopt.errors import BadInputError
from moeopt.ir.model import MoEModel
from moeopt.ir.table import ExpertTable, SlotInfo
from moeopt.passes.base import Pass, PassContext, PassResult
from moeopt.passes.importance import Importance
from moeopt.passes.match import MatchResult
from moeopt.passes.options import Option
from moeopt.passes.registry import register
from moeopt.passes.sensitivity import loss_scores


def neuron_features(w_in: torch.Tensor, w_out: torch.Tensor, inter: int, glu: bool) -> torch.Tensor:
    """(I, 3H) or (I, 2H): everything attached to each hidden neuron (its gate row, up row, down column)."""
    parts = [w_in[:inter], w_in[inter:]] if glu else [w_in]
    return torch.cat([*parts, w_out.T], dim=1).double()


def align(hot: torch.Tensor, mod: torch.Tensor, method: str) -> np.ndarray:
    """perm with mod[perm[i]] the neuron of the moderate expert that plays hot neuron i.

    Args:
        hot, mod: (I, D) neuron features.
        method: assignment (scipy's Hungarian solver on squared distances) or ot (POT's exact EMD).
    """
    cost = torch.cdist(hot, mod).pow(2).numpy()  # (I, I)
    if method == "assignment":
        rows, cols = linear_sum_assignment(cost)
        perm = np.empty_like(cols)
        perm[rows] = cols
        return perm
    import ot

    n = cost.shape[0]
    plan = ot.emd(np.full(n, 1.0 / n), np.full(n, 1.0 / n), cost)  # a permutation matrix / n at a vertex
    return np.asarray(plan.argmax(axis=1))


def merge_slots(
    table: ExpertTable, hot_slot: int, mod_slots: list[int], weights: list[float], method: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Merged (w_in, w_out, b_in, b_out) of a hot slot and its moderate slots.

    Written as hot + sum_m (w_m / W) * (aligned_m - hot), which equals the weighted mean and is exactly
    `hot` when every aligned moderate equals it or has weight 0.
    """
    spec = table.spec
    inter = spec.intermediate
    total = float(sum(weights))
    if total <= 0:
        raise BadInputError(f"merge: importance weights {weights} sum to {total}")
    w_in, w_out = table.w_in[hot_slot].clone(), table.w_out[hot_slot].clone()
    b_in = None if table.b_in is None else table.b_in[hot_slot].clone()
    b_out = None if table.b_out is None else table.b_out[hot_slot].clone()
    feats_hot = neuron_features(table.w_in[hot_slot], table.w_out[hot_slot], inter, spec.glu)
    for s, w in zip(mod_slots, weights[1:], strict=True):
        m_in, m_out = table.w_in[s], table.w_out[s]
        m_bin = None if table.b_in is None else table.b_in[s]
        if method != "none":
            perm = torch.as_tensor(align(feats_hot, neuron_features(m_in, m_out, inter, spec.glu), method))
            rows = torch.cat([perm, perm + inter]) if spec.glu else perm
            m_in, m_out = m_in[rows], m_out[:, perm]
            m_bin = None if m_bin is None else m_bin[rows]
        c = w / total
        w_in += c * (m_in - table.w_in[hot_slot])
        w_out += c * (m_out - table.w_out[hot_slot])
        if b_in is not None and m_bin is not None and table.b_in is not None:
            b_in += c * (m_bin - table.b_in[hot_slot])
        if b_out is not None and table.b_out is not None:
            b_out += c * (table.b_out[s] - table.b_out[hot_slot])
    return w_in, w_out, b_in, b_out


def _merge_job(
    table: ExpertTable, method: str, job: tuple[int, list[int], list[float]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    return merge_slots(table, job[0], job[1], job[2], method)


def _weights(ctx: PassContext, imp: Importance | None, layer: int, kind: str) -> torch.Tensor | None:
    """(E,) merge weight of every original expert of `layer` by `kind`; None for uniform weights."""
    if kind == "uniform":
        return None
    if kind == "loss":
        return loss_scores(ctx, layer, "merge{weight=loss}")
    if imp is None:
        raise BadInputError(f"merge{{weight={kind}}} needs routing statistics: run importance first")
    return imp.score(layer, kind)


@register
class Merge(Pass):
    name = "merge"
    kind = "transform"
    summary = "align each matched moderate expert's neurons to its hot expert and average by importance"
    options = (
        Option("align", "choice", "assignment", "neuron alignment", choices=("assignment", "ot", "none")),
        Option("weight", "choice", "freq", "importance used as merge weight (loss: the sensitivity analysis)",
               choices=("freq", "prob", "loss", "uniform")),
    )

    def requires(self, model: MoEModel, ctx: PassContext) -> None:
        if ctx.analyses.peek("matching") is None:
            raise BadInputError("merge needs the pairs of `match` earlier in the pipeline")

    def call(self, model: MoEModel, ctx: PassContext) -> PassResult:
        match: MatchResult = ctx.analyses.peek("matching")
        imp = ctx.analyses.peek("importance")
        # Every layer's weights before any layer changes: a missing analysis fails with nothing merged.
        scores = [_weights(ctx, imp, i, self.opts["weight"]) for i in range(len(model.layers))]
        merged = 0
        for i, layer in enumerate(model.layers):
            pairs = match.assignment[i]
            if not pairs:
                continue
            t = layer.table
            score = scores[i]
            groups: dict[int, list[int]] = {}
            for m, h in sorted(pairs.items()):
                groups.setdefault(h, []).append(m)
            new_in, new_out = t.w_in.clone(), t.w_out.clone()
            new_bin = None if t.b_in is None else t.b_in.clone()
            new_bout = None if t.b_out is None else t.b_out.clone()
            infos = list(t.slots)
            drop: set[int] = set()
            jobs: list[tuple[int, list[int], list[float]]] = []  # (hot slot, moderate slots, weights)
            for h, mods in groups.items():
                members = [h, *mods]
                # A slot's weight is the importance of every expert already routed to it.
                wts = [1.0 if score is None else float(sum(score[e] for e in t.slots[int(t.slot_of[x])].members))
                       for x in members]
                jobs.append((int(t.slot_of[h]), [int(t.slot_of[m]) for m in mods],
                             wts if sum(wts) > 0 else [1.0] * len(members)))
            # Distributed: each hot expert's alignment and average on one rank, results all-gathered.
            results = distributed.map_items(jobs, functools.partial(_merge_job, t, str(self.opts["align"])))
            for (h, mods), (hs, ms, wts), (wi, wo, bi, bo) in zip(groups.items(), jobs, results, strict=True):
                members = [h, *mods]
                new_in[hs], new_out[hs] = wi, wo
                if new_bin is not None and bi is not None:
                    new_bin[hs] = bi
                if new_bout is not None and bo is not None:
                    new_bout[hs] = bo
                all_members = [e for x in members for e in t.slots[int(t.slot_of[x])].members]
                infos[hs] = SlotInfo(tuple(all_members), None, float(sum(wts)))
                drop.update(ms)
                merged += len(mods)
            keep = torch.tensor([s for s in range(t.num_slots) if s not in drop], dtype=torch.long)
            t.set_slots(
                new_in[keep], new_out[keep], [infos[s] for s in keep.tolist()],
                None if new_bin is None else new_bin[keep], None if new_bout is None else new_bout[keep],
            )
        return PassResult(model, merged > 0, frozenset({"importance"}), {"experts-merged": merged})
