"""`prune`: classify each layer's experts cold / moderate / hot and remove the cold ones.

LiteMoE ranks experts by importance on the app's data; the top `keep` share is hot (kept as slots), the
bottom `cold` share is removed, the rest is moderate and left for `match` + `merge` to fold into hot
experts. With cold = 1 - keep there is no moderate class and this is plain pruning. The baselines share
this code and differ only in the ranking: frequency (least routed dropped), random, magnitude (largest
weight norm kept).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeopt.errors import BadInputError
from moeopt.ir.model import MoEModel
from moeopt.passes.base import Pass, PassContext, PassResult
from moeopt.passes.options import Option
from moeopt.passes.registry import register
from moeopt.passes.sensitivity import loss_scores


@dataclass(frozen=True)
class ExpertClasses:
    """One layer's classification, by original expert id (hot first by rank)."""

    hot: tuple[int, ...]
    moderate: tuple[int, ...]
    cold: tuple[int, ...]


def rank_experts(
    model: MoEModel, ctx: PassContext, layer: int, method: str, score: str, seed: int
) -> list[int]:
    """The layer's currently kept (slot-owning) experts, most important first."""
    t = model.layers[layer].table
    owners = [info.members[0] for info in t.slots]
    if method == "random":
        g = torch.Generator().manual_seed(seed * 100_003 + layer)
        return [owners[i] for i in torch.randperm(len(owners), generator=g).tolist()]
    if method == "magnitude":
        norms = ctx.analyses.get("expert-norms", model, ctx)[layer]
        return [owners[s] for s in sorted(range(len(owners)), key=lambda s: (-norms[s], owners[s]))]
    if score == "loss":
        rise = loss_scores(ctx, layer, "prune{score=loss}")
        return sorted(owners, key=lambda e: (-float(rise[e]), e))
    imp = ctx.analyses.peek("importance")
    if imp is None:
        raise BadInputError(f"prune{{method={method}}} needs routing statistics: run `importance{{calib=...}}` first")
    norms_t = None
    if score == "swapmoe":
        norms = ctx.analyses.get("expert-norms", model, ctx)[layer]
        norms_t = torch.zeros(t.num_experts, dtype=torch.float64)
        for s, e in enumerate(owners):
            norms_t[e] = norms[s]
    values = imp.score(layer, score, norms_t)
    return sorted(owners, key=lambda e: (-float(values[e]), e))


def classify(ranked: list[int], num_experts: int, top_k: int, keep: float, cold: float) -> ExpertClasses:
    """Split a ranking into hot / moderate / cold by shares of the ORIGINAL expert count."""
    n_hot = min(len(ranked), max(top_k, round(keep * num_experts)))
    n_cold = min(len(ranked) - n_hot, round(cold * num_experts))
    n_mod = len(ranked) - n_hot - n_cold
    return ExpertClasses(
        tuple(ranked[:n_hot]), tuple(ranked[n_hot : n_hot + n_mod]), tuple(ranked[n_hot + n_mod :])
    )


def classify_by_thresholds(
    ranked: list[int], freq: torch.Tensor, top_k: int, alpha: float, beta: float
) -> ExpertClasses:
    """LiteMoE's thresholds: cold if share < alpha/E, hot if share >= beta/E (shares of routing choices)."""
    e = freq.numel()
    hot = [x for x in ranked if float(freq[x]) >= beta / e]
    for x in ranked:  # top_k experts must stay routable
        if len(hot) >= top_k:
            break
        if x not in hot:
            hot.append(x)
    rest = [x for x in ranked if x not in hot]
    cold = [x for x in rest if float(freq[x]) < alpha / e]
    mod = [x for x in rest if x not in cold]
    return ExpertClasses(tuple(hot), tuple(mod), tuple(cold))


@register
class Prune(Pass):
    name = "prune"
    kind = "transform"
    summary = "classify experts cold / moderate / hot by importance and remove the cold ones"
    options = (
        Option("keep", "float", 0.5, "share of the original experts kept as slots (hot)", min=0.0, max=1.0),
        Option("cold", "float", -1.0, "share removed outright; -1: 1 - keep (no moderate)", min=-1.0, max=1.0),
        Option("alpha", "float", -1.0, "threshold mode: cold if routing share < alpha/E (-1: off)", min=-1.0),
        Option("beta", "float", -1.0, "threshold mode: hot if routing share >= beta/E (-1: off)", min=-1.0),
        Option("method", "choice", "importance", "ranking", choices=("importance", "frequency", "random", "magnitude")),
        Option("score", "choice", "freq", "importance kind for method=importance (loss: the sensitivity analysis)",
               choices=("freq", "prob", "swapmoe", "loss")),
        Option("seed", "int", 0, "seed of method=random"),
    )

    def requires(self, model: MoEModel, ctx: PassContext) -> None:
        o = self.opts
        if (o["alpha"] >= 0) != (o["beta"] >= 0):
            raise BadInputError("prune: give both alpha and beta (threshold mode) or neither")
        if o["alpha"] >= 0 and o["alpha"] > o["beta"]:
            raise BadInputError(f"prune: alpha={o['alpha']} must not exceed beta={o['beta']}")
        if o["cold"] >= 0 and o["keep"] + o["cold"] > 1.0 + 1e-9:
            raise BadInputError(f"prune: keep={o['keep']} + cold={o['cold']} exceeds 1")

    def call(self, model: MoEModel, ctx: PassContext) -> PassResult:
        o = self.opts
        method = "importance" if o["method"] == "frequency" else o["method"]
        score = "freq" if o["method"] == "frequency" else o["score"]
        cold_share = 1.0 - o["keep"] if o["cold"] < 0 else o["cold"]
        classes: list[ExpertClasses] = []
        removed = 0
        for i, layer in enumerate(model.layers):
            t = layer.table
            ranked = rank_experts(model, ctx, i, method, score, o["seed"])
            if o["alpha"] >= 0:
                imp = ctx.analyses.peek("importance")
                if imp is None:
                    raise BadInputError("prune{alpha,beta} needs routing statistics: run importance first")
                cls = classify_by_thresholds(ranked, imp.layers[i].freq, layer.router.top_k, o["alpha"], o["beta"])
            else:
                cls = classify(ranked, t.num_experts, layer.router.top_k, o["keep"], cold_share)
            classes.append(cls)
            drop = set(cls.cold)
            keep_slots = [s for s, info in enumerate(t.slots) if info.members[0] not in drop]
            if len(keep_slots) < t.num_slots:
                removed += t.num_slots - len(keep_slots)
                t.select_slots(keep_slots)
        ctx.analyses.put("expert-classes", classes)
        stats: dict[str, float] = {
            "experts-removed": removed,
            "hot": sum(len(c.hot) for c in classes),
            "moderate": sum(len(c.moderate) for c in classes),
        }
        return PassResult(model, removed > 0, frozenset({"importance", "sensitivity", "expert-classes"}), stats)
