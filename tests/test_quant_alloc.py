"""Bit allocation: never over budget, optimal against brute force, one-line infeasibility errors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeopt.errors import InfeasibleBudgetError
from moeopt.quant.allocate import (
    Choice,
    Item,
    brute_force,
    check_feasible,
    min_cost,
    solve_greedy,
    solve_ilp,
    solve_uniform,
    total,
)

BITS: tuple[int | None, ...] = (2, 3, 4, 8, None)


@st.composite
def instances(draw: st.DrawFn, max_items: int = 5) -> tuple[list[Item], int]:
    """Random items (1-4 choices each, costs 1..1000, errors 0..1) and a capacity around the feasible range."""
    n = draw(st.integers(1, max_items))
    items = []
    for i in range(n):
        k = draw(st.integers(1, 4))
        bits = draw(st.permutations(BITS))[:k]
        choices = tuple(Choice(b, draw(st.integers(1, 1000)), draw(st.floats(0, 1, allow_nan=False))) for b in bits)
        items.append(Item(i // 3, i % 3, choices))
    lo = min_cost(items)
    hi = sum(max(c.cost for c in it.choices) for it in items)
    capacity = draw(st.integers(max(0, lo - 50), hi + 50))
    return items, capacity


@settings(max_examples=60, deadline=None)
@given(instances())
def test_ilp_never_exceeds_budget_and_matches_brute_force(inst: tuple[list[Item], int]) -> None:
    items, capacity = inst
    best = brute_force(items, capacity)
    if best is None:
        with pytest.raises(InfeasibleBudgetError):
            solve_ilp(items, capacity)
        return
    picks = solve_ilp(items, capacity)
    cost, err = total(items, picks)
    assert cost <= capacity
    # abs 1e-6 on errors in [0, 1]: CBC stops within its own optimality tolerance, and hypothesis found a case
    # where it returned 1.19e-7 above an optimum of 0 (two choices whose errors differ by less than that).
    assert err == pytest.approx(best[0], rel=1e-6, abs=1e-6)


@settings(max_examples=100, deadline=None)
@given(instances(max_items=8))
def test_greedy_never_exceeds_budget_and_is_no_better_than_optimal(inst: tuple[list[Item], int]) -> None:
    items, capacity = inst
    if min_cost(items) > capacity:
        with pytest.raises(InfeasibleBudgetError):
            solve_greedy(items, capacity)
        return
    cost, err = total(items, solve_greedy(items, capacity))
    assert cost <= capacity
    if len(items) <= 5:
        best = brute_force(items, capacity)
        assert best is not None and err >= best[0] - 1e-9


@settings(max_examples=20, deadline=None)
@given(n=st.integers(30, 80), seed=st.integers(0, 1000))
def test_ilp_on_many_large_costs_stays_within_budget(n: int, seed: int) -> None:
    # Byte-sized costs (millions) as in real models: CBC's tolerances must not let the sum creep over.
    import random

    rng = random.Random(seed)
    items = [Item(0, i, tuple(Choice(b, rng.randint(10**6, 10**7) * (b or 16), rng.random() / (b or 100))
                              for b in BITS)) for i in range(n)]
    capacity = rng.randint(min_cost(items), sum(max(c.cost for c in it.choices) for it in items))
    assert total(items, solve_ilp(items, capacity))[0] <= capacity
    assert total(items, solve_greedy(items, capacity))[0] <= capacity


def test_infeasible_budget_is_one_line_naming_the_minimum() -> None:
    items = [Item(0, s, (Choice(2, 100, 0.5), Choice(None, 800, 0.0))) for s in range(3)]
    with pytest.raises(InfeasibleBudgetError) as err:
        check_feasible(items, 299)
    msg = str(err.value)
    assert "\n" not in msg and "300" in msg and "299" in msg
    assert total(items, solve_ilp(items, 300)) == (300, 1.5)


def test_uniform_and_pins() -> None:
    items = [Item(0, 0, (Choice(2, 1, 1.0), Choice(4, 2, 0.5))), Item(0, 1, (Choice(8, 4, 0.0),))]
    assert solve_uniform(items, 4) == [1, 0]  # the pinned item keeps its only choice
    with pytest.raises(InfeasibleBudgetError, match="does not allow 3 bits"):
        solve_uniform(items, 3)


def test_greedy_lowers_the_least_sensitive_expert_first() -> None:
    sensitive = Item(0, 0, (Choice(8, 8, 0.0), Choice(4, 4, 1.0)))
    robust = Item(0, 1, (Choice(8, 8, 0.0), Choice(4, 4, 0.01)))
    assert solve_greedy([sensitive, robust], 12) == [0, 1]
