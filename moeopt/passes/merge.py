"""`merge`: fold each matched moderate expert into its hot expert.

The moderate expert's hidden neurons are first aligned to the hot expert's (a permutation found by
linear assignment with scipy, or by optimal transport with POT), then the two are averaged with
importance weights. Routing keeps the original router: slot_of sends the moderate expert's choices to
the merged slot, where they add to the hot expert's. `align=none` is the no-alignment baseline.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from moeopt import distributed
from moeopt.errors import BadInputError
from moeopt.ir.model import MoEModel
from moeopt.ir.table import ExpertTable, SlotInfo
from moeopt.passes.base import Pass, PassContext, PassResult
from moeopt.passes.importance import Importance
from moeopt.passes.match import MatchResult, Weights
from moeopt.passes.options import Option
from moeopt.passes.registry import register
from moeopt.passes.sensitivity import loss_scores


def neuron_cost(hot: Weights, mod: Weights, inter: int, glu: bool) -> np.ndarray:
    """(I, I) float64 cost of giving hot neuron i the moderate expert's neuron j: minus the dot product of
    their features (gate row, up row, down column).

    The assignment minimising the summed squared feature distances |h_i - m_j|^2 = |h_i|^2 + |m_j|^2 -
    2 h_i.m_j is the one maximising the summed dot products, since the squared norms add a constant per row
    and per column (true for OT with uniform marginals too). The products are accumulated part by part
    from the float32 weights, so no (I, 3H) float64 feature copies are made: on Mixtral-8x7B's experts
    (I = 14336) that is 2.8 GB less, and the (I, I) matrix is the one large buffer.
    """
    parts_h = [hot[0][:inter], hot[0][inter:]] if glu else [hot[0]]
    parts_m = [mod[0][:inter], mod[0][inter:]] if glu else [mod[0]]
    dots = hot[1].T @ mod[1]  # down columns: (I, H) x (H, I)
    for a, b in zip(parts_h, parts_m, strict=True):
        dots.addmm_(a, b.T)
    cost = dots.neg_().double().numpy()
    del dots
    return cost


def align(cost: np.ndarray, method: str) -> np.ndarray:
    """perm with mod[perm[i]] the neuron of the moderate expert that plays hot neuron i.

    Args:
        cost: (I, I) cost of pairing hot neuron i with moderate neuron j (`neuron_cost`).
        method: assignment (scipy's linear_sum_assignment) or ot (POT's exact EMD).
    """
    if method == "assignment":
        rows, cols = linear_sum_assignment(cost)
        perm = np.empty_like(cols)
        perm[rows] = cols
        return perm
    import ot

    n = cost.shape[0]
    plan = ot.emd(np.full(n, 1.0 / n), np.full(n, 1.0 / n), cost)  # a permutation matrix / n at a vertex
    return np.asarray(plan.argmax(axis=1))


def alignment(hot: Weights, mod: Weights, inter: int, glu: bool, method: str) -> np.ndarray | None:
    """The moderate expert's neuron permutation onto the hot expert (None for method `none`)."""
    if method == "none":
        return None
    return align(neuron_cost(hot, mod, inter, glu), method)


def merge_weights(hot: Weights, mods: Iterable[tuple[Weights, np.ndarray | None]], weights: list[float],
                  inter: int, glu: bool, owned: bool = False) -> Weights:
    """The importance-weighted mean of a hot expert and its moderate experts, each moderate permuted by its
    alignment first. `mods` may be a generator (the streamed compile reads one moderate expert at a time);
    `owned`: the moderate weights are the caller's own copies, changed in place (no copy is made of them).

    Written as hot + sum_m (w_m / W) * (aligned_m - hot), which equals the weighted mean and is exactly
    `hot` when every aligned moderate equals it or has weight 0.
    """
    total = float(sum(weights))
    if total <= 0:
        raise BadInputError(f"merge: importance weights {weights} sum to {total}")
    h_in, h_out, h_bin, h_bout = hot
    w_in, w_out = h_in.clone(), h_out.clone()
    b_in = None if h_bin is None else h_bin.clone()
    b_out = None if h_bout is None else h_bout.clone()
    for ((m_in, m_out, m_bin, m_bout), perm), w in zip(mods, weights[1:], strict=True):
        if perm is not None:  # the permuted copies are ours to change in place
            p = torch.as_tensor(perm)
            rows = torch.cat([p, p + inter]) if glu else p
            m_in, m_out = m_in[rows], m_out[:, p]
            m_bin = None if m_bin is None else m_bin[rows]
        elif not owned:
            m_in, m_out, m_bin = m_in.clone(), m_out.clone(), None if m_bin is None else m_bin.clone()
        c = w / total
        # w += (m - h) * c, in place on the moderate's copy: no other temporaries of an expert's size
        # (the same float operations as w += c * (m - h))
        w_in += m_in.sub_(h_in).mul_(c)
        w_out += m_out.sub_(h_out).mul_(c)
        del m_in, m_out
        if b_in is not None and m_bin is not None and h_bin is not None:
            b_in += m_bin.sub_(h_bin).mul_(c)
        if b_out is not None and m_bout is not None and h_bout is not None:
            b_out += c * (m_bout - h_bout)
    return w_in, w_out, b_in, b_out


def slot_weights(table: ExpertTable, s: int) -> Weights:
    return (table.w_in[s], table.w_out[s], None if table.b_in is None else table.b_in[s],
            None if table.b_out is None else table.b_out[s])


def merge_slots(table: ExpertTable, hot_slot: int, mod_slots: list[int], weights: list[float], method: str) -> Weights:
    """Merged (w_in, w_out, b_in, b_out) of a hot slot and its moderate slots (`merge_weights`), each
    moderate aligned to the hot expert by `method` (assignment, ot or none)."""
    spec = table.spec
    hot = slot_weights(table, hot_slot)
    mods = [slot_weights(table, s) for s in mod_slots]
    aligned = [(m, alignment(hot, m, spec.intermediate, spec.glu, method)) for m in mods]
    return merge_weights(hot, aligned, weights, spec.intermediate, spec.glu)


Job = tuple[int, list[int], list[float]]  # (hot slot, moderate slots, merge weights: hot's first)


def plan_merge(slots: Sequence[SlotInfo], pairs: dict[int, int], score: torch.Tensor | None
               ) -> tuple[list[Job], list[SlotInfo], list[int]]:
    """What merging one layer's matched pairs does to its slots, before any weight is touched.

    Args:
        slots: the layer's slots (after prune).
        pairs: moderate expert -> hot expert (original ids, `match`'s assignment).
        score: (E,) merge weight of every original expert; None: uniform.
    Returns:
        the jobs (one per hot expert that takes moderates, in the order of its first moderate), the slot
        infos of the layer after merging (the kept slots in order, a merged slot listing every expert routed
        to it, its importance the sum of the merged weights) and the kept slot indices (moderate slots go).
    """
    slot_of = {e: s for s, info in enumerate(slots) for e in info.members}
    groups: dict[int, list[int]] = {}
    for m, h in sorted(pairs.items()):
        groups.setdefault(h, []).append(m)
    infos = list(slots)
    drop: set[int] = set()
    jobs: list[Job] = []
    for h, mods in groups.items():
        members = [h, *mods]
        # A slot's weight is the importance of every expert already routed to it.
        wts = [1.0 if score is None else float(sum(score[e] for e in slots[slot_of[x]].members)) for x in members]
        wts = wts if sum(wts) > 0 else [1.0] * len(members)
        hs, ms = slot_of[h], [slot_of[m] for m in mods]
        jobs.append((hs, ms, wts))
        infos[hs] = SlotInfo(tuple(e for x in members for e in slots[slot_of[x]].members), None, float(sum(wts)))
        drop.update(ms)
    keep = [s for s in range(len(slots)) if s not in drop]
    return jobs, [infos[s] for s in keep], keep



def _merge_job(table: ExpertTable, method: str, job: Job) -> Weights:
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
            jobs, infos, keep_slots = plan_merge(t.slots, pairs, scores[i])
            # Distributed: each hot expert's alignment and average on one rank, results all-gathered.
            results = distributed.map_items(jobs, functools.partial(_merge_job, t, str(self.opts["align"])))
            new_in, new_out = t.w_in.clone(), t.w_out.clone()
            new_bin = None if t.b_in is None else t.b_in.clone()
            new_bout = None if t.b_out is None else t.b_out.clone()
            for (hs, ms, _), (wi, wo, bi, bo) in zip(jobs, results, strict=True):
                new_in[hs], new_out[hs] = wi, wo
                if new_bin is not None and bi is not None:
                    new_bin[hs] = bi
                if new_bout is not None and bo is not None:
                    new_bout[hs] = bo
                merged += len(ms)
            keep = torch.tensor(keep_slots, dtype=torch.long)
            t.set_slots(
                new_in[keep], new_out[keep], infos,
                None if new_bin is None else new_bin[keep], None if new_bout is None else new_bout[keep],
            )
        return PassResult(model, merged > 0, frozenset({"importance"}), {"experts-merged": merged})
