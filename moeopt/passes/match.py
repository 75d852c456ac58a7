"""`match`: assign every moderate expert to a hot expert of its layer by an integer program (pulp + CBC).

Maximise the total similarity of the assigned pairs, each moderate expert to exactly one hot expert,
at most `capacity` moderate experts per hot one. All layers go into one program (they are independent
blocks; one CBC call costs less than one per layer). Similarity: correlation of router outputs on the
calibration data (router), cosine of the experts' outputs on sampled layer inputs (output), or cosine
of their neuron-permutation-invariant products W_out @ W_gate (weight).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pulp
import torch
import torch.nn.functional as F

from moeopt.errors import BadInputError, InfeasibleBudgetError
from moeopt.ir.compute import _dense
from moeopt.ir.model import MoEModel
from moeopt.ir.spec import ExpertSpec
from moeopt.passes.base import Pass, PassContext, PassResult
from moeopt.passes.importance import LayerStats
from moeopt.passes.options import Option
from moeopt.passes.prune import ExpertClasses
from moeopt.passes.registry import register


@dataclass(frozen=True)
class MatchResult:
    """assignment[layer] maps a moderate expert to its hot expert (original ids)."""

    assignment: tuple[dict[int, int], ...]
    objective: float
    status: str
    seconds: float


def solve_matching(sims: list[np.ndarray], capacities: list[int]) -> tuple[list[dict[int, int]], float, str]:
    """Max-similarity assignment of rows (moderate) to columns (hot) per block, column capacity bounded.

    Args:
        sims: per block an (M, H) similarity matrix.
        capacities: per block the most rows one column may take.
    Returns:
        per block {row: column}, the objective, and CBC's status string.
    """
    prob = pulp.LpProblem("moeopt_match", pulp.LpMaximize)
    x: dict[tuple[int, int, int], pulp.LpVariable] = {}
    for b, (sim, cap) in enumerate(zip(sims, capacities, strict=True)):
        m, h = sim.shape
        if m == 0:
            continue
        if h == 0 or m > cap * h:
            raise InfeasibleBudgetError(
                f"match: block {b} has {m} moderate experts but {h} hot experts x capacity {cap} = {cap * h} places"
            )
        for i in range(m):
            for j in range(h):
                x[b, i, j] = pulp.LpVariable(f"x_{b}_{i}_{j}", cat="Binary")
        for i in range(m):
            prob += pulp.lpSum(x[b, i, j] for j in range(h)) == 1
        for j in range(h):
            prob += pulp.lpSum(x[b, i, j] for i in range(m)) <= cap
    if not x:
        return [{} for _ in sims], 0.0, "Optimal"
    prob += pulp.lpSum(float(sims[b][i, j]) * v for (b, i, j), v in x.items())
    status = pulp.LpStatus[prob.solve(pulp.PULP_CBC_CMD(msg=False))]
    if status != "Optimal":
        raise InfeasibleBudgetError(f"match: the assignment program is {status.lower()}")
    out: list[dict[int, int]] = [{} for _ in sims]
    for (b, i, j), v in x.items():
        if (v.value() or 0.0) > 0.5:
            out[b][i] = j
    return out, float(pulp.value(prob.objective)), status


Weights = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]  # w_in, w_out, b_in, b_out
ExpertGetter = Callable[[int], Weights]


def similarity(model: MoEModel, ctx: PassContext, layer: int, moderate: tuple[int, ...], hot: tuple[int, ...],
               kind: str) -> np.ndarray:
    """(M, H) similarity between moderate and hot experts of one layer."""
    t = model.layers[layer].table
    imp = ctx.analyses.peek("importance")

    def expert(e: int) -> Weights:
        s = int(t.slot_of[e])
        return (t.w_in[s], t.w_out[s], None if t.b_in is None else t.b_in[s],
                None if t.b_out is None else t.b_out[s])

    return layer_similarity(kind, None if imp is None else imp.layers[layer], moderate, hot, expert, t.spec)


def layer_similarity(kind: str, stats: LayerStats | None, moderate: tuple[int, ...], hot: tuple[int, ...],
                     expert: ExpertGetter, spec: ExpertSpec) -> np.ndarray:
    """(M, H) similarity between moderate and hot experts of one layer, from its routing statistics
    (`router`, `output`: their sampled inputs) and its experts' weights, got one expert at a time by
    `expert(e)` (the streamed compile reads each from the checkpoint)."""
    if kind == "router":
        if stats is None:
            raise BadInputError("match{similarity=router} needs routing statistics: run importance first")
        corr = stats.router_similarity()
        return corr[list(moderate)][:, list(hot)].numpy()
    if kind == "weight":
        inter = spec.intermediate

        def invariant(e: int) -> torch.Tensor:  # (H, H): unchanged by permuting the expert's neurons
            w_in, w_out, _, _ = expert(e)
            return (w_out.double() @ w_in[:inter].double()).flatten()

        mods = torch.stack([invariant(e) for e in moderate])
        hots = torch.stack([invariant(e) for e in hot])
        return (F.normalize(mods, dim=1) @ F.normalize(hots, dim=1).T).numpy()
    if stats is None or stats.inputs().numel() == 0:
        raise BadInputError("match{similarity=output} needs sampled layer inputs: run importance first")
    x = stats.inputs()

    def out(e: int) -> torch.Tensor:
        w_in, w_out, b_in, b_out = expert(e)
        return _dense(x.to(w_in.dtype), w_in, w_out, b_in, b_out, spec.act, spec.glu, spec).double().flatten()

    mods = torch.stack([out(e) for e in moderate])
    hots = torch.stack([out(e) for e in hot])
    return (F.normalize(mods, dim=1) @ F.normalize(hots, dim=1).T).numpy()


def capacity(opt: int, moderate: int, hot: int) -> int:
    """Moderate experts one hot expert may take: the option, or (0) the fewest that fit."""
    return opt or max(1, math.ceil(moderate / max(hot, 1)))


@register
class Match(Pass):
    name = "match"
    kind = "transform"
    summary = "ILP (pulp/CBC): assign each moderate expert to a similar hot expert, with capacity limits"
    options = (
        Option("similarity", "choice", "router", "what 'similar' means", choices=("router", "output", "weight")),
        Option("capacity", "int", 0, "moderate experts per hot expert at most (0: the fewest that fit)", min=0),
    )

    def requires(self, model: MoEModel, ctx: PassContext) -> None:
        if ctx.analyses.peek("expert-classes") is None:
            raise BadInputError("match needs the hot/moderate classes of `prune` earlier in the pipeline")

    def call(self, model: MoEModel, ctx: PassContext) -> PassResult:
        classes: list[ExpertClasses] = ctx.analyses.peek("expert-classes")
        sims, caps = [], []
        for i, cls in enumerate(classes):
            sims.append(similarity(model, ctx, i, cls.moderate, cls.hot, self.opts["similarity"])
                        if cls.moderate else np.zeros((0, len(cls.hot))))
            caps.append(capacity(self.opts["capacity"], len(cls.moderate), len(cls.hot)))
        t0 = time.perf_counter()
        rows, objective, status = solve_matching(sims, caps)
        seconds = time.perf_counter() - t0
        assignment = tuple(
            {cls.moderate[r]: cls.hot[c] for r, c in rows[i].items()} for i, cls in enumerate(classes)
        )
        ctx.analyses.put("matching", MatchResult(assignment, objective, status, seconds))
        stats = {"pairs": sum(len(a) for a in assignment), "objective": round(objective, 6),
                 "solve-seconds": round(seconds, 3)}
        return PassResult(model, False, frozenset({"importance", "sensitivity", "expert-classes", "matching"}), stats)
