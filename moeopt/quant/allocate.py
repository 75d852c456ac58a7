"""Bit allocation: pick one choice (bitwidth or float) per expert under one cost budget.

A multiple-choice knapsack: item i (one expert slot of one layer) takes exactly one of its choices,
each with a cost (bytes, or params x nominal bits for an average-bits budget) and an error (its
routing-weighted sensitivity); minimise the summed error subject to summed cost <= capacity.
`solve_ilp` is exact (pulp + CBC); `solve_greedy` is EdgeMoE's lowering by sensitivity; `brute_force`
is the test oracle.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import pulp

from moeopt.errors import InfeasibleBudgetError


@dataclass(frozen=True)
class Choice:
    """One way to store an expert: bits (None = keep float), its cost and its error."""

    bits: int | None
    cost: int  # in the budget's unit (bytes, or bit-parameters for avg_bits)
    error: float

    def __post_init__(self) -> None:
        if self.cost < 0 or not self.error >= 0:
            raise ValueError(f"choice needs cost >= 0 and error >= 0, got {self.cost}, {self.error}")


@dataclass(frozen=True)
class Item:
    """One expert slot and its allowed choices (a pinned slot has exactly one)."""

    layer: int
    slot: int
    choices: tuple[Choice, ...]

    def __post_init__(self) -> None:
        if not self.choices:
            raise ValueError(f"layer {self.layer} slot {self.slot} has no allowed choice")


def min_cost(items: Sequence[Item]) -> int:
    return sum(min(c.cost for c in it.choices) for it in items)


def total(items: Sequence[Item], picks: Sequence[int]) -> tuple[int, float]:
    """(cost, error) of a selection (picks[i] indexes items[i].choices)."""
    chosen = [it.choices[p] for it, p in zip(items, picks, strict=True)]
    return sum(c.cost for c in chosen), sum(c.error for c in chosen)


def check_feasible(items: Sequence[Item], capacity: int, unit: str = "B") -> None:
    """Raise InfeasibleBudgetError (one line, naming the minimum) when nothing fits."""
    need = min_cost(items)
    if need > capacity:
        raise InfeasibleBudgetError(
            f"budget {capacity:,} {unit} is below the smallest possible size {need:,} {unit} "
            f"(every expert at its lowest allowed bitwidth); raise the budget or allow fewer bits"
        )


def solve_ilp(items: Sequence[Item], capacity: int, time_limit: float = 60.0) -> list[int]:
    """The optimal selection by integer programming (CBC with zero optimality gap)."""
    check_feasible(items, capacity)
    scale = max((c.error for it in items for c in it.choices), default=0.0) or 1.0
    cap = capacity
    for _ in range(4):  # CBC's feasibility tolerance may round a huge cost row; tighten and retry
        picks = _ilp_once(items, cap, scale, time_limit)
        cost, _ = total(items, picks)
        if cost <= capacity:
            return picks
        cap -= cost - capacity
    raise InfeasibleBudgetError(f"the solver found no selection within {capacity:,} (numerical trouble)")


def _ilp_once(items: Sequence[Item], capacity: int, scale: float, time_limit: float) -> list[int]:
    prob = pulp.LpProblem("bit_allocation", pulp.LpMinimize)
    x = [[pulp.LpVariable(f"x_{i}_{j}", cat="Binary") for j in range(len(it.choices))] for i, it in enumerate(items)]
    prob += pulp.lpSum(c.error / scale * v for it, xs in zip(items, x, strict=True)
                       for c, v in zip(it.choices, xs, strict=True))
    for xs in x:
        prob += pulp.lpSum(xs) == 1
    prob += pulp.lpSum(c.cost * v for it, xs in zip(items, x, strict=True)
                       for c, v in zip(it.choices, xs, strict=True)) <= capacity
    status = prob.solve(pulp.PULP_CBC_CMD(msg=False, gapRel=0.0, gapAbs=0.0, timeLimit=time_limit))
    if pulp.LpStatus[status] != "Optimal":
        raise InfeasibleBudgetError(f"bit allocation: solver status {pulp.LpStatus[status]}")
    return [max(range(len(xs)), key=lambda j, xs=xs: float(xs[j].value() or 0.0)) for xs in x]  # type: ignore[misc]


def solve_greedy(items: Sequence[Item], capacity: int) -> list[int]:
    """EdgeMoE-style: start every expert at its costliest choice, then repeatedly take the step down
    (to the next cheaper choice) that adds the least error per unit of cost saved, until it fits."""
    check_feasible(items, capacity)
    order = [_costliest_first(it) for it in items]
    pos = [0] * len(items)
    cost = sum(it.choices[o[0]].cost for it, o in zip(items, order, strict=True))
    while cost > capacity:
        best: tuple[float, int] | None = None
        for i, it in enumerate(items):
            if pos[i] + 1 >= len(order[i]):
                continue
            cur, nxt = it.choices[order[i][pos[i]]], it.choices[order[i][pos[i] + 1]]
            saved = cur.cost - nxt.cost
            ratio = (nxt.error - cur.error) / saved if saved > 0 else float("-inf")
            if best is None or ratio < best[0]:
                best = (ratio, i)
        assert best is not None  # check_feasible guarantees a step remains while over capacity
        i = best[1]
        cost -= items[i].choices[order[i][pos[i]]].cost - items[i].choices[order[i][pos[i] + 1]].cost
        pos[i] += 1
    return [order[i][pos[i]] for i in range(len(items))]


def _costliest_first(it: Item) -> list[int]:
    return sorted(range(len(it.choices)), key=lambda j: (-it.choices[j].cost, it.choices[j].error))


def solve_uniform(items: Sequence[Item], bits: int | None) -> list[int]:
    """Every expert at `bits` (pinned experts keep their single choice)."""
    picks = []
    for it in items:
        match = [j for j, c in enumerate(it.choices) if c.bits == bits]
        if match:
            picks.append(match[0])
        elif len(it.choices) == 1:  # pinned to something else
            picks.append(0)
        else:
            raise InfeasibleBudgetError(f"layer {it.layer} slot {it.slot} does not allow {bits} bits")
    return picks


def brute_force(items: Sequence[Item], capacity: int) -> tuple[float, list[int]] | None:
    """Exhaustive search (tiny instances only): the least error within capacity, or None."""
    best: tuple[float, list[int]] | None = None
    for picks in itertools.product(*[range(len(it.choices)) for it in items]):
        cost, err = total(items, picks)
        if cost <= capacity and (best is None or err < best[0]):
            best = (err, list(picks))
    return best
