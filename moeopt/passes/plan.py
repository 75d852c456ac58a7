"""`plan` (analysis): SwapMoE's budget planner. Which experts stay resident, how big the expert cache is.

Offload mode (``lower{experts=offload}``) keeps each layer's *hot* experts in the resident graphs and
every other (*cold*) expert in a packed file read into a byte-bounded cache. Under a memory budget for
experts (hot bytes + cache bytes) the planner picks the hot sets and the cache size that minimise the
expected time per token of the expert work, given routing frequencies, expert sizes and a measured
target profile (`moeopt.targets`).

Latency model (per token, in expectation; `evaluate` computes it):
- slot s of MoE layer l is used r = top_k(l) * f(l, s) times per token, f = its share of the layer's
  routing choices (the `importance` analysis, else SlotInfo.importance, else uniform);
- a hot use costs `resident_s`; a cold use costs `cold_s` (its own prepacked session), plus, on a
  cache miss, reading its page-aligned record at the profile's bandwidth (record_bytes / bandwidth) and
  prepacking it (`pack_s`);
- the cache (all of the budget the hot experts leave) is ideal LFU in steady state: it keeps *cached*
  the cold experts worth the most, which always hit; every other cold expert always misses. It must
  also hold the *working frames* a step loads misses into: for each layer, its min(top_k, uncached)
  largest uncached cold experts; the largest such set over layers (`working_bytes`). A plan is feasible
  iff hot + cached + working bytes <= budget. No plan exists below `min_budget` = the largest layer's
  top_k experts (every expert cold): that is `InfeasibleBudgetError`, naming the minimum.
The replacement policy (`policy`) is recorded for the runtime; the model is every policy's best case.

Solver, exact for this model. When every expert has one size (float, or one bitwidth: the common
case) a small search: for each possible number w of working frames (0..top_k) the layers that would
need more must hold all but w experts, and the other places go greedily to the largest savings (with
equal sizes the exchange argument makes greedy optimal); the best w wins. O(top_k x experts log
experts), milliseconds at 32 x 64 experts. With mixed sizes (per-expert bitwidths) that greedy step is a
knapsack, so one integer program (pulp + CBC) over binary hot/cached choices and a binary per layer for
the active branch of min(top_k, uncached); working frames are then sized by the layer's largest expert
(exact when each layer has one size, conservative otherwise), and a time limit bounds CBC (the plan's
"solver" says whether optimality was proven). Both are checked against enumeration in tests/test_plan.py.
Exact solutions are monotone: a bigger budget never gives a slower plan.

The plan (`model.plan`, a JSON-able dict saved with the checkpoint and copied into the artifact)::

    {"budget_bytes": int, "latency_target_ms": float | None,
     "hot": [[slot, ...] per MoE layer], "cached": [[slot, ...] per MoE layer],
     "cache_bytes": int, "policy": "lru" | "lfu" | "edgemoe" | "swapmoe",
     "expected": {"latency_ms_per_token": float, "misses_per_token": float,
                  "hit_rate": float (cold uses that hit the cache; 1.0 when nothing is cold),
                  "resident_expert_bytes": int},
     "layers": [{"hot": n, "cold": n, "cached": n, "latency_ms": float, "misses": float} per MoE layer],
     "profile": {...the target profile used...}, "frequency_source": "importance" | "slot-importance" | "uniform",
     "min_budget_bytes": int, "solver": str, "meets_latency": bool, "warnings": [str, ...],
     "num_slots": [S per MoE layer] (the slots the plan was made for)}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pulp

from moeopt.errors import BadInputError, InfeasibleBudgetError
from moeopt.ir.model import MoEModel
from moeopt.passes.base import ALL, Pass, PassContext, PassResult
from moeopt.passes.options import Option
from moeopt.passes.registry import register
from moeopt.targets import block_for, check_profile, expert_bytes, load_profile, measure_profile, page_align
from moeopt.units import format_bytes, parse_seconds

POLICIES = ("lru", "lfu", "edgemoe", "swapmoe")
DEFAULT_POLICY = "lfu"  # the planner's latency model is ideal LFU; under the graph predictor's prefetches LFU also
# decoded fastest of LRU, LFU and EdgeMoE's eviction on the reference model (bench/results/offload-sweep/policy)


@dataclass(frozen=True)
class PlanProblem:
    """What the planner optimises over; every list is per MoE layer (per slot inside).

    rates: uses per token of each slot (top_k x routing share); nbytes: bytes of each expert in memory
    (a hot expert and a cache frame alike); read_s: seconds to read and prepack each expert on a miss.
    """

    rates: tuple[tuple[float, ...], ...]
    nbytes: tuple[tuple[int, ...], ...]
    read_s: tuple[tuple[float, ...], ...]
    top_k: tuple[int, ...]
    resident_s: tuple[float, ...]
    cold_s: tuple[float, ...]

    def slots(self, layer: int) -> range:
        return range(len(self.rates[layer]))


@dataclass(frozen=True)
class Expected:
    """The model's figures for one choice of hot and cached experts."""

    latency_s: float
    misses: float
    hit_rate: float
    hot_bytes: int
    cached_bytes: int
    working_bytes: int
    per_layer: tuple[tuple[float, float], ...]  # (seconds, misses) per layer

    @property
    def needed_bytes(self) -> int:
        return self.hot_bytes + self.cached_bytes + self.working_bytes


def min_budget(p: PlanProblem) -> int:
    """The smallest expert budget any plan runs in: the largest layer's top_k largest experts."""
    return min_budget_of(p.nbytes, p.top_k)


def min_budget_of(nbytes: Sequence[Sequence[int]], top_k: Sequence[int]) -> int:
    """`min_budget` from per-layer expert sizes and top_k."""
    return max(sum(sorted(b, reverse=True)[: min(k, len(b))]) for b, k in zip(nbytes, top_k, strict=True))


def check_budget(budget: int, need: int) -> None:
    """InfeasibleBudgetError naming the minimum when `budget` < `need`."""
    if budget < need:
        raise InfeasibleBudgetError(
            f"expert budget {budget} bytes ({format_bytes(budget)}) is below what one layer's top_k cold experts "
            f"need; the minimum is {need} bytes ({format_bytes(need)})")


def working_bytes(p: PlanProblem, hot: list[set[int]], cached: list[set[int]]) -> int:
    """Frames a step needs for its misses: max over layers of the min(top_k, uncached) largest uncached."""
    need = 0
    for li, k in enumerate(p.top_k):
        unc = sorted((p.nbytes[li][s] for s in p.slots(li) if s not in hot[li] and s not in cached[li]), reverse=True)
        need = max(need, sum(unc[:k]))
    return need


def evaluate(p: PlanProblem, hot: list[set[int]], cached: list[set[int]]) -> Expected:
    """Expected per-token expert time, misses and hit rate of a choice (see the module docstring)."""
    total = misses = cold_uses = hits = 0.0
    per_layer = []
    for li in range(len(p.rates)):
        t = m = 0.0
        for s in p.slots(li):
            r = p.rates[li][s]
            if s in hot[li]:
                t += r * p.resident_s[li]
                continue
            t += r * p.cold_s[li]
            cold_uses += r
            if s in cached[li]:
                hits += r
            else:
                t += r * p.read_s[li][s]
                m += r
        per_layer.append((t, m))
        total, misses = total + t, misses + m
    hot_b = sum(p.nbytes[li][s] for li in range(len(hot)) for s in hot[li])
    cached_b = sum(p.nbytes[li][s] for li in range(len(cached)) for s in cached[li])
    return Expected(total, misses, hits / cold_uses if cold_uses > 0 else 1.0, hot_b, cached_b,
                    working_bytes(p, hot, cached), tuple(per_layer))


def solve(p: PlanProblem, budget: int, *, time_limit: float = 30.0) -> tuple[list[set[int]], list[set[int]], str]:
    """(hot, cached, how it was solved): the choice minimising `evaluate(...).latency_s` within `budget`.

    One expert size everywhere: an exact search (`_search`); mixed sizes: an integer program (`_ilp`).

    Raises:
        InfeasibleBudgetError: budget < `min_budget` (the message names the minimum).
    """
    check_budget(budget, min_budget(p))
    if len({b for row in p.nbytes for b in row}) == 1:
        return _search(p, budget)
    return _ilp(p, budget, time_limit)


def _savings(p: PlanProblem, li: int, s: int) -> tuple[float, bool]:
    """(saving over a missed cold use, whether hot saves at least as much as cached) of one expert."""
    r, read = p.rates[li][s], p.read_s[li][s]
    hot, cached = r * (p.cold_s[li] + read - p.resident_s[li]), r * read
    return max(hot, cached), hot >= cached


def _search(p: PlanProblem, budget: int) -> tuple[list[set[int]], list[set[int]], str]:
    """Exact when every expert has one size b. Held (hot or cached) experts cost b each and save their
    `_savings`; so for each possible working-frame count w (0..max top_k) a layer must hold all but
    min(w, ...) of its experts, and the rest of (budget - w b) // b places go to the best savings left:
    with equal sizes the exchange argument makes that greedy choice optimal. Best over w."""
    b = p.nbytes[0][0]
    sav = {(li, s): _savings(p, li, s) for li in range(len(p.rates)) for s in p.slots(li)}
    order = {li: sorted(p.slots(li), key=lambda s: (-sav[li, s][0], s)) for li in range(len(p.rates))}
    best: tuple[float, list[set[int]]] = (-1.0, [])
    for w in range(max(min(k, len(r)) for k, r in zip(p.top_k, p.rates, strict=True)) + 1):
        places = (budget - w * b) // b
        if places < 0:
            break
        held: list[set[int]] = [set() for _ in p.rates]
        for li, k in enumerate(p.top_k):
            n = len(p.rates[li])
            if min(k, n) > w:  # this layer may leave at most w experts uncached
                held[li].update(order[li][: n - w])
        if sum(map(len, held)) > places:
            continue
        rest = sorted(((li, s) for li in order for s in order[li] if s not in held[li]),
                      key=lambda key: (-sav[key][0], key))
        for li, s in rest[: places - sum(map(len, held))]:
            if sav[li, s][0] > 0:
                held[li].add(s)
        value = sum(sav[li, s][0] for li in range(len(held)) for s in held[li])
        if value > best[0] + 1e-15:
            best = (value, held)
    hot = [{s for s in h if sav[li, s][1]} for li, h in enumerate(best[1])]
    cached = [h - hot[li] for li, h in enumerate(best[1])]
    return hot, cached, "search:optimal"


def _ilp(p: PlanProblem, budget: int, time_limit: float) -> tuple[list[set[int]], list[set[int]], str]:
    """Mixed expert sizes: one integer program (pulp + CBC), binary hot/cached per expert and a binary
    per layer for the active branch of min(top_k, uncached); working frames sized by the layer's
    largest expert (exact when each layer has one size, conservative otherwise)."""
    prob = pulp.LpProblem("moeopt_plan", pulp.LpMinimize)
    keys = [(li, s) for li in range(len(p.rates)) for s in p.slots(li)]
    x = {key: pulp.LpVariable(f"hot_{key[0]}_{key[1]}", cat="Binary") for key in keys}
    y = {key: pulp.LpVariable(f"cached_{key[0]}_{key[1]}", cat="Binary") for key in keys}
    work = pulp.LpVariable("working_bytes", lowBound=0)
    for key in keys:
        prob += x[key] + y[key] <= 1
    for li, k in enumerate(p.top_k):
        n, b = len(p.rates[li]), max(p.nbytes[li])
        uncached = n - pulp.lpSum(x[li, s] + y[li, s] for s in p.slots(li))
        branch = pulp.LpVariable(f"few_uncached_{li}", cat="Binary")  # 1: uncached < top_k counts
        prob += work >= b * uncached - b * n * (1 - branch)
        prob += work >= b * min(k, n) * (1 - branch)
    prob += pulp.lpSum(p.nbytes[li][s] * (x[li, s] + y[li, s]) for li, s in keys) + work <= budget
    # The constant part (every use cold and missed) is left out; each term is a saving. Coefficients are
    # scaled to a largest magnitude of 1e6: in seconds they are ~1e-6, below CBC's tolerances.
    coef = {key: (p.rates[key[0]][key[1]] * (p.resident_s[key[0]] - p.cold_s[key[0]] - p.read_s[key[0]][key[1]]),
                  -p.rates[key[0]][key[1]] * p.read_s[key[0]][key[1]]) for key in keys}
    scale = 1e6 / max([abs(v) for pair in coef.values() for v in pair] + [1e-30])
    prob += pulp.lpSum(scale * (coef[key][0] * x[key] + coef[key][1] * y[key]) for key in keys)
    status = pulp.LpStatus[prob.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, gapRel=0.0))]
    if status != "Optimal":
        raise InfeasibleBudgetError(f"plan: the budget program is {status.lower()} at {budget} bytes")
    hot: list[set[int]] = [set() for _ in p.rates]
    cached: list[set[int]] = [set() for _ in p.rates]
    for li, s in keys:
        if (x[li, s].value() or 0.0) > 0.5:
            hot[li].add(s)
        elif (y[li, s].value() or 0.0) > 0.5:
            cached[li].add(s)
    proven = prob.sol_status == pulp.LpSolutionOptimal
    return hot, cached, "ilp:optimal" if proven else f"ilp:best-after-{time_limit:g}s"


# --- the model side: frequencies, sizes, profile ----------------------------------------------------------


def routing_shares(model: MoEModel, ctx: PassContext) -> tuple[list[list[float]], str]:
    """Per layer per slot: share of the layer's routing choices, and where it came from."""
    imp = ctx.analyses.peek("importance")
    with_slots = all(info.importance is not None for layer in model.layers for info in layer.table.slots)
    source = "importance" if imp is not None else "slot-importance" if with_slots else "uniform"
    out = []
    for li, layer in enumerate(model.layers):
        t = layer.table
        if imp is not None:  # over original experts; a slot takes its members' shares
            freq = imp.layers[li].freq  # (E,)
            shares = [float(sum(float(freq[e]) for e in info.members)) for info in t.slots]
        elif with_slots:
            shares = [float(info.importance or 0.0) for info in t.slots]
        else:
            shares = [1.0] * t.num_slots
        total = sum(shares)  # pruned experts' shares are gone: renormalise over the slots
        out.append([s / total if total > 0 else 1.0 / len(shares) for s in shares])
    return out, source


def slot_bytes(model: MoEModel, bits: int | None) -> list[list[int]]:
    """Per layer per slot: bytes as stored (packed + scales if quantized, else float32, or at `bits`)."""
    out = []
    for layer in model.layers:
        t, spec = layer.table, layer.table.spec
        bias = 4 * (spec.in_rows + spec.hidden) if t.b_in is not None else 0
        row = []
        for s, info in enumerate(t.slots):
            if info.bits is not None:
                n = 0
                for name in ("w_in", "w_out"):
                    q: Any = t.quantized[f"{s}_{name}"]
                    n += q.packed.numel() + q.scales.numel() * q.scales.element_size()
                    n += 0 if q.zero_points is None else q.zero_points.numel()
                row.append(n + bias)
            else:
                block = block_for(spec.hidden, spec.intermediate) if bits is not None else 32
                row.append(expert_bytes(spec.hidden, spec.intermediate, bits, spec.glu, block) + bias)
        out.append(row)
    return out


def layer_bits(model: MoEModel, bits: int | None) -> int | None:
    """The bitwidth most of the model's slots have (None: float), or `bits` for float models."""
    counts: dict[int | None, int] = {}
    for layer in model.layers:
        for info in layer.table.slots:
            counts[info.bits] = counts.get(info.bits, 0) + 1
    common = max(counts, key=lambda b: counts[b])
    return bits if common is None else common


def build_problem(model: MoEModel, shares: list[list[float]], nbytes: list[list[int]],
                  profile: dict[str, Any]) -> PlanProblem:
    """The planner's inputs; profile times are scaled to each layer's expert size (H x I) linearly."""
    ref = profile["expert"]
    bw = float(profile["read_bandwidth"])
    rates, read, res, cold, ks = [], [], [], [], []
    for layer, share, sizes in zip(model.layers, shares, nbytes, strict=True):
        spec, k = layer.table.spec, layer.router.top_k
        scale = spec.hidden * spec.intermediate / (ref["hidden"] * ref["intermediate"])
        rates.append(tuple(k * f for f in share))
        pack = float(profile.get("pack_s_per_expert", 0.0)) * scale  # a load also prepacks the expert
        read.append(tuple(page_align(b) / bw + pack for b in sizes))
        res.append(float(profile["resident_s_per_expert"]) * scale)
        cold.append(float(profile["cold_s_per_expert"]) * scale)
        ks.append(k)
    return PlanProblem(tuple(rates), tuple(tuple(b) for b in nbytes), tuple(read), tuple(ks), tuple(res), tuple(cold))


def profile_mismatch(model: MoEModel, profile: dict[str, Any], bits: int | None) -> list[str]:
    """Warnings where the profile was measured for other experts than the model's (times are scaled)."""
    ref, spec = profile["expert"], model.layers[0].table.spec
    out = []
    if (ref["hidden"], ref["intermediate"]) != (spec.hidden, spec.intermediate):
        out.append(f"profile measured for {ref['hidden']}x{ref['intermediate']} experts, the model's are "
                   f"{spec.hidden}x{spec.intermediate}: expert times scaled by size")
    if "bits" in ref and ref["bits"] != bits:
        out.append(f"profile measured for {ref['bits'] or 'float32'} experts, the plan assumes {bits or 'float32'}")
    return out


@register
class Plan(Pass):
    name = "plan"
    kind = "analysis"
    summary = "SwapMoE's budget planner: per-layer resident (hot) experts and cache size for offload mode"
    exact = True  # the model's outputs do not change
    options = (
        Option("budget", "size", None, "bytes for experts in memory: hot experts + expert cache (e.g. 64MB)"),
        Option("latency", "str", "", "target time per token (e.g. 50ms); missing it is a warning, not an error"),
        Option("profile", "str", "measure", "target profile JSON (moeopt profile), or 'measure' on this machine"),
        Option("policy", "choice", DEFAULT_POLICY, "cache replacement policy the runtime uses", choices=POLICIES),
        Option("bits", "choice", "auto", "expert bitwidth to assume for float experts (auto: float32)",
               choices=("auto", "2", "3", "4", "8")),
        Option("threads", "int", 1, "intra-op threads when measuring the profile", min=1),
    )

    def requires(self, model: MoEModel, ctx: PassContext) -> None:
        if self.opts["budget"] is None:
            raise BadInputError("plan needs a budget: plan{budget=64MB}")
        if self.opts["latency"]:
            parse_seconds(self.opts["latency"])
        if not model.layers:
            raise BadInputError("plan needs a model with MoE layers")

    def _profile(self, model: MoEModel, bits: int | None) -> dict[str, Any]:
        src = self.opts["profile"]
        if src != "measure":
            return load_profile(Path(src))
        spec = model.layers[0].table.spec
        return measure_profile(spec.hidden, spec.intermediate, layer_bits(model, bits), spec.glu,
                               threads=self.opts["threads"])

    def call(self, model: MoEModel, ctx: PassContext) -> PassResult:
        budget = int(self.opts["budget"])
        bits = None if self.opts["bits"] == "auto" else int(self.opts["bits"])
        target = parse_seconds(self.opts["latency"]) if self.opts["latency"] else None
        nbytes = slot_bytes(model, bits)
        check_budget(budget, min_budget_of(nbytes, [layer.router.top_k for layer in model.layers]))  # before timing
        profile = check_profile(self._profile(model, bits))
        shares, source = routing_shares(model, ctx)
        problem = build_problem(model, shares, nbytes, profile)
        hot, cached, status = solve(problem, budget)
        e = evaluate(problem, hot, cached)
        latency_ms = e.latency_s * 1e3
        meets = target is None or latency_ms <= target * 1e3 + 1e-9
        warnings = [] if target is None or meets else [
            f"expected {latency_ms:.3f} ms/token misses the {target * 1e3:g} ms target at {format_bytes(budget)}"]
        warnings += profile_mismatch(model, profile, layer_bits(model, bits))
        for w in warnings:
            ctx.log(f"plan: warning: {w}")
        model.plan = {
            "budget_bytes": budget, "latency_target_ms": None if target is None else target * 1e3,
            "hot": [sorted(h) for h in hot], "cached": [sorted(c) for c in cached],
            "cache_bytes": budget - e.hot_bytes, "policy": self.opts["policy"],
            "expected": {"latency_ms_per_token": latency_ms, "misses_per_token": e.misses, "hit_rate": e.hit_rate,
                         "resident_expert_bytes": e.hot_bytes},
            "layers": [{"hot": len(hot[li]), "cold": len(problem.rates[li]) - len(hot[li]), "cached": len(cached[li]),
                        "latency_ms": t * 1e3, "misses": m} for li, (t, m) in enumerate(e.per_layer)],
            "profile": profile, "frequency_source": source, "min_budget_bytes": min_budget(problem),
            "solver": status, "meets_latency": meets, "warnings": warnings,
            "num_slots": [layer.table.num_slots for layer in model.layers],  # a later prune/merge makes it stale
        }
        stats: dict[str, float] = {
            "hot-experts": sum(len(h) for h in hot), "cache-bytes": budget - e.hot_bytes,
            "resident-expert-bytes": e.hot_bytes, "latency-ms-per-token": round(latency_ms, 4),
            "misses-per-token": round(e.misses, 4), "hit-rate": round(e.hit_rate, 4),
            "meets-latency": float(meets), "optimal": float(status.endswith(":optimal")),
        }
        if not meets:
            stats["warning-latency-over-target-ms"] = round(latency_ms - (target or 0.0) * 1e3, 4)
        return PassResult(model, False, ALL, stats)
