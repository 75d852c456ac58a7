"""`quantize`: per-expert bitwidths under a byte or average-bits budget, group-wise integer quantization.

Methods: `ilp` (optimal multiple-choice knapsack over measured sensitivities), `greedy` (EdgeMoE's
lowering by sensitivity) and `uniform` (every expert at `bits`). Routed experts are always quantized;
the other linears (attention, shared experts, dense MLPs; lm_head with `lm-head=true`; embeddings never)
follow `non-experts` (see `moeopt.quant.linears`):
- `float` (default): they stay float, and `budget` / `avg-bits` count the routed experts only;
- `4` / `8`: every one at that width; the budget counts them too (their fixed bytes come off it);
- `auto`: ilp/greedy choose each one's width among `candidates` by its measured sensitivity, in the
  same knapsack as the experts, under the one budget (uniform: `bits`).

Pins fix chosen experts: `pin=LAYER:SLOT@BITS;...` where LAYER and SLOT are numbers or `*` and BITS is
2, 3, 4, 8 or `float`; `pin=0@8` pins every slot of layer 0, later entries win. Example:
`quantize{avg-bits=3,pin=0:*@8;*:0@float}`. Slots are physical slots (= expert ids before pruning).

Rounding (`algo`): `rtn` rounds each weight to the nearest grid point; `gptq` (moeopt.quant.gptq)
compensates each column's rounding error using per-expert Hessians from the calibration tokens routed
to each expert (`calibrate-all-experts=true`: every token through every expert), measured in one pass
through the float model (moeopt.quant.expert_gptq says what that means); `act-order` and `damp` are
GPTQ's. An expert no calibration token reaches is rounded to nearest, with a warning, and counted in
the report. With algo=gptq the ilp/greedy sensitivities are the GPTQ errors at each candidate width, so
the allocation weighs the error that will actually be stored. Both write the same packed layout.
Example: `quantize{algo=gptq,avg-bits=3,calib=app:intent,calibrate-all-experts=true}`.

After the pass: `slot.bits` is set, `table.quantized` holds the packed MatMulNBits-layout matrices,
and `w_in` / `w_out` hold their dequantized values (the reference numerics); `model.linears` likewise
holds the packed non-expert linears, whose nn.Linear weights hold the dequantized values.
"""

from __future__ import annotations

import functools
import re
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from moeopt import distributed
from moeopt.errors import BadInputError, InfeasibleBudgetError
from moeopt.ir.model import MoEModel
from moeopt.passes.base import Pass, PassContext, PassResult
from moeopt.passes.options import Option
from moeopt.passes.registry import register
from moeopt.quant import linears
from moeopt.quant.allocate import Choice, Item, solve_greedy, solve_ilp, solve_uniform, total
from moeopt.quant.apply import quantize_slot, slot_bytes, slot_params
from moeopt.quant.expert_gptq import ExpertGPTQ, RTNFallbackWarning, collect_hessians
from moeopt.quant.fisher import fisher_sensitivity
from moeopt.quant.groupwise import (
    BITS,
    GROUPS,
    SCALE_DTYPES,
    Quantized,
    ScaleRangeError,
    Search,
    quantize,
    scale_storage,
    searched,
)
from moeopt.quant.report import QuantReport
from moeopt.quant.sensitivity import Sensitivity, measure

SENSITIVITY = "quant-sensitivity"
REPORT = "quantize-report"
_PIN = re.compile(r"^(\*|\d+)(?::(\*|\d+))?[@=](float|\d+)$")

Pins = dict[tuple[int, int], int | None]


def parse_bits(raw: str) -> int | None:
    """'4' -> 4, 'float' / 'fp16' / '16' -> None (keep float); anything else is a BadInputError."""
    if raw.lower() in ("float", "fp16", "16"):
        return None
    if raw.isdigit() and int(raw) in BITS:
        return int(raw)
    raise BadInputError(f"bitwidth '{raw}' is not one of {', '.join(map(str, BITS))}, float")


def parse_pins(entries: tuple[str, ...], model: MoEModel) -> Pins:
    """`LAYER[:SLOT]@BITS` entries -> {(layer, slot): bits}; out-of-range numbers are errors."""
    pins: Pins = {}
    for entry in entries:
        m = _PIN.match(entry.strip())
        if not m:
            raise BadInputError(f"pin '{entry}' is not LAYER:SLOT@BITS (e.g. 0:*@8, 3:5@4, *:0@float)")
        lay_s, slot_s, bits_s = m.group(1), m.group(2) or "*", m.group(3)
        bits = parse_bits(bits_s)
        n_layers = len(model.layers)
        if lay_s != "*" and int(lay_s) >= n_layers:
            raise BadInputError(f"pin '{entry}': layer {lay_s} does not exist (0..{n_layers - 1})")
        layers = range(n_layers) if lay_s == "*" else [int(lay_s)]
        for li in layers:
            n_slots = model.layers[li].table.num_slots
            if slot_s != "*" and int(slot_s) >= n_slots:
                raise BadInputError(f"pin '{entry}': layer {li} has slots 0..{n_slots - 1}")
            for s in range(n_slots) if slot_s == "*" else [int(slot_s)]:
                pins[(li, s)] = bits
    return pins


def scale_search(opts: Mapping[str, Any]) -> frozenset[int]:
    """The widths whose groups get the scale search (groupwise.search_params), from the pass's `scales` and
    `algo` options; the streamed compile (`moeopt.stream.compile`) quantizes with the same choice."""
    mode = opts["scales"]
    if mode == "auto":  # bench/results/quantize-real: RTN u4 27.68 minmax / 27.98 searched; GPTQ u4 27.46 / 25.79
        return frozenset({2, 3, 4}) if opts["algo"] == "gptq" else frozenset({2, 3})
    return frozenset(BITS) if mode == "mse" else frozenset()


@register
class Quantize(Pass):
    name = "quantize"
    kind = "transform"
    summary = "per-expert bitwidths (ILP / greedy / uniform) and group-wise quantization of routed experts"
    options = (
        Option("method", "choice", "ilp", "how bits are chosen", choices=("ilp", "greedy", "uniform")),
        Option("budget", "size", None, "routed-expert bytes at most (e.g. 40MB); ilp/greedy"),
        Option("avg-bits", "float", None, "average code bits per expert weight at most (float = 16)", min=1, max=16),
        Option("bits", "str", "4", "bitwidth for method=uniform: 2, 3, 4, 8 or float"),
        Option("candidates", "list", ("2", "3", "4", "8", "float"), "bitwidths ilp/greedy may choose"),
        Option("group", "int", 64, "quantization block size along the input dimension (16/32/64/128/256)"),
        Option("symmetric", "bool", False, "no zero points (ORT's default zero point 2**(bits-1))"),
        Option("pin", "list", (), "fixed bits: LAYER:SLOT@BITS entries, numbers or *, e.g. 0:*@8;3:5@4"),
        Option("calib", "list", (), "calibration JSONL files or app:NAME, ';'-separated; random tokens when absent"),
        Option("calib-tokens", "int", 4096, "calibration tokens for the sensitivity analysis", min=1),
        Option("seq-len", "int", 128, "calibration sequence length", min=2),
        Option("max-rows", "int", 512, "routed inputs kept per expert for the sensitivity", min=1),
        Option("algo", "choice", "rtn", "rounding: rtn (to nearest) or gptq (error-compensating, per-expert "
               "Hessians from the calibration data)", choices=("rtn", "gptq")),
        Option("calibrate-all-experts", "bool", False, "algo=gptq: every calibration token through every expert "
               "for the Hessians (the output still follows the routing)"),
        Option("act-order", "bool", True, "algo=gptq: quantize columns by descending Hessian diagonal"),
        Option("damp", "float", 0.01, "algo=gptq: Hessian damping relative to its mean diagonal", min=0, max=10),
        Option("scales", "choice", "auto", "each group's scale and zero point: minmax (its extremes), mse "
               "(searched to minimise the weighted squared error; with algo=gptq also weighted by the Hessian "
               "diagonal), or auto (what measured better on SmolLM2: mse at 2 and 3 bits, and at 4 with "
               "algo=gptq; minmax otherwise)",
               choices=("auto", "minmax", "mse")),
        Option("sensitivity", "choice", "output", "ilp/greedy: each expert's own output error on its routed inputs "
               "(output), or the loss increase at the model's output, 1/2 sum F dW^2 with F the diagonal Fisher "
               "of the calibration loss (fisher; moeopt.quant.fisher)", choices=("output", "fisher")),
        Option("min-bits", "int", None, "floor width: candidates below it are dropped (pins still win)", min=2, max=8),
        Option("metric", "choice", "mse", "sensitivity: routing-weighted output MSE, or relative to each layer's "
               "expert output energy (weighs layers alike)", choices=("mse", "relative")),
        Option("non-experts", "str", "float", "attention, shared-expert and dense linears: 4, 8, float, or auto "
               "(ilp/greedy choose among candidates under the same budget; uniform: bits)"),
        Option("scale-dtype", "choice", "float32", "how each block's scale is stored: float32, or float16 (a "
               "quarter bit less per weight at group 64; each scale is rounded to float16 before the codes are "
               "chosen, so the artifact computes exactly what PyTorch does)", choices=tuple(SCALE_DTYPES)),
        Option("lm-head", "bool", False, "quantize lm_head too (needs non-experts; embeddings stay float)"),
    )

    def requires(self, model: MoEModel, ctx: PassContext) -> None:
        o = self.opts
        if o["group"] not in GROUPS:
            raise BadInputError(f"group must be one of {', '.join(map(str, GROUPS))}, got {o['group']}")
        if o["method"] != "uniform" and (o["budget"] is None) == (o["avg-bits"] is None):
            raise BadInputError(f"method={o['method']} needs exactly one of budget=SIZE or avg-bits=N")
        done = [(layer.index, s) for layer in model.layers for s, i in enumerate(layer.table.slots) if i.bits]
        if done:
            raise BadInputError(f"layer {done[0][0]} slot {done[0][1]} is already quantized; quantize the float model")
        if model.linears:
            raise BadInputError(f"linear '{next(iter(model.linears))}' is already quantized; quantize the float model")
        if linears.parse_mode(o["non-experts"]) is None and o["lm-head"]:
            raise BadInputError("lm-head=true needs non-experts=4, 8 or auto")

    def call(self, model: MoEModel, ctx: PassContext) -> PassResult:
        """Quantize with every block scale in the `scale-dtype` the artifact will store (see `scale_storage`)."""
        try:
            with scale_storage(SCALE_DTYPES[str(self.opts["scale-dtype"])]):
                return self._call(model, ctx)
        except ScaleRangeError as e:
            raise BadInputError(f"quantize{{scale-dtype={self.opts['scale-dtype']}}}: {e}") from None

    def _call(self, model: MoEModel, ctx: PassContext) -> PassResult:
        o = self.opts
        group, sym, method = int(o["group"]), bool(o["symmetric"]), str(o["method"])
        pins = parse_pins(tuple(o["pin"]), model)
        if method == "uniform":
            cands: list[int | None] = [parse_bits(str(o["bits"]))]
        else:
            cands = list(dict.fromkeys(parse_bits(str(c)) for c in o["candidates"]))
            if o["min-bits"] is not None:
                cands = [c for c in cands if c is None or c >= int(o["min-bits"])]
                if not cands:
                    raise BadInputError(f"min-bits={o['min-bits']} leaves no candidate width")
        need_sens = method != "uniform"
        measured = sorted({b for b in [*cands, *pins.values()] if b is not None})  # pins may name other bits
        gq = self._gptq(model, ctx, group, sym) if o["algo"] == "gptq" and measured else None
        sens = self._sensitivity(model, ctx, measured, group, sym, gq) if need_sens else None
        by_avg = o["avg-bits"] is not None
        relative = o["metric"] == "relative" and o["sensitivity"] == "output"  # fisher: already in loss units
        items: list[Item] = []
        for li, layer in enumerate(model.layers):
            t = layer.table
            for s in range(t.num_slots):
                allowed = [pins[(li, s)]] if (li, s) in pins else cands
                items.append(Item(li, s, tuple(
                    Choice(b, slot_params(t) * (16 if b is None else b) if by_avg else slot_bytes(t, b, group, sym),
                           0.0 if sens is None else sens.error(li, s, b, relative))
                    for b in allowed
                )))
        experts = len(items)
        widths, hessians = self._linear_items(model, ctx, items, cands, group, sym, by_avg)
        capacity = self._capacity(model, list(widths))
        if method == "ilp":
            assert capacity is not None
            picks = solve_ilp(items, capacity)
        elif method == "greedy":
            assert capacity is not None
            picks = solve_greedy(items, capacity)
        else:
            picks = solve_uniform(items, cands[0])
            if capacity is not None and total(items, picks)[0] > capacity:
                raise InfeasibleBudgetError(f"uniform {o['bits']}-bit needs {total(items, picks)[0]:,} "
                                            f"{'bit-params' if by_avg else 'B'}, over the budget {capacity:,}")
        bits: list[list[int | None]] = [[None] * layer.table.num_slots for layer in model.layers]
        chosen = [(it.layer, it.slot, it.choices[p].bits) for it, p in zip(items[:experts], picks[:experts],
                                                                             strict=True)]
        packed = shared_slot_matrices(model, chosen, group, sym, gq, self._search())
        for k, (li, s, b) in enumerate(chosen):
            bits[li][s] = b
            quantizer = None if gq is None else functools.partial(gq.matrix, li, s)
            if packed is not None:
                quantizer = functools.partial(_lookup, packed[k])
            quantize_slot(model.layers[li].table, s, b, group, sym, quantizer, search=self._search())
        for path, it, p in zip(widths, items[experts:], picks[experts:], strict=True):
            widths[path] = it.choices[p].bits
        n_linears = linears.quantize_linears(model, widths, group, sym, algo=str(o["algo"]), hessians=hessians,
                                             **self._gptq_opts())
        report = QuantReport(
            method=method, group=group, symmetric=sym, bits=bits,
            layer_bytes=[layer.table.expert_bytes() for layer in model.layers],
            float_bytes=sum(slot_params(layer.table) * 2 * layer.table.num_slots for layer in model.layers),
            params=sum(slot_params(layer.table) * layer.table.num_slots for layer in model.layers),
            capacity=capacity, unit="bit-params" if by_avg else "B", error=total(items, picks)[1], pinned=len(pins),
            linears=widths, linear_bytes=linears.stored_bytes(model)
            + sum(linears.linear_bytes(model, p, None, group, sym) for p, b in widths.items() if b is None),
            linear_float_bytes=sum(linears.linear_bytes(model, p, None, group, sym) for p in widths),
            algo=str(o["algo"]), rtn_fallback=0 if gq is None else gptq_fallbacks(gq, bits, ctx),
        )
        stored = report.total_bytes + report.linear_bytes
        if not by_avg and capacity is not None and stored > capacity:  # the cost model is wrong
            raise RuntimeError(f"stored {stored:,} B exceed the budget {capacity:,} B")
        ctx.analyses.put(REPORT, report)
        ctx.log(report.summary())
        quantized = sum(b is not None for row in bits for b in row) + n_linears
        if quantized and model.storage_dtype != "float32":
            # A half-precision checkpoint would round the fp32 scales and the dequantized weights (whose
            # (q - zp) * scale products need more mantissa than fp16 has), so save/load would not be exact.
            ctx.log(f"quantize: checkpoint storage dtype {model.storage_dtype} -> float32 (exact scales)")
            model.storage_dtype = "float32"
        # Weights changed, so every routing/importance analysis downstream is stale; keep only our report.
        return PassResult(model, quantized > 0, frozenset({REPORT}), report.stats())

    def _capacity(self, model: MoEModel, paths: list[str]) -> int | None:
        o = self.opts
        if o["budget"] is not None:
            return int(o["budget"])
        if o["avg-bits"] is not None:
            params = sum(slot_params(layer.table) * layer.table.num_slots for layer in model.layers)
            params += sum(linears.linear_params(model, p) for p in paths)
            return int(float(o["avg-bits"]) * params)
        return None

    def _linear_items(
        self, model: MoEModel, ctx: PassContext, items: list[Item], cands: list[int | None], group: int, sym: bool,
        by_avg: bool,
    ) -> tuple[dict[str, int | None], dict[str, torch.Tensor] | None]:
        """Append one Item per non-expert linear to `items` (their allowed widths, costs, sensitivities).

        Returns ({path: None} in the same order, for the caller to fill with the chosen widths; the input
        Hessians when measured (the sensitivity reads them; so would GPTQ), else None).
        """
        o = self.opts
        mode = linears.parse_mode(o["non-experts"])
        if mode is None:
            return {}, None
        paths = linears.targets(model, bool(o["lm-head"]))
        allowed: list[int | None] = ([mode] if isinstance(mode, int) else cands)
        measure_them = o["method"] != "uniform" and len(allowed) > 1
        hessians = None
        if measure_them or linears.needs_hessian(str(o["algo"])):
            batches = calibration_batches(model, tuple(o["calib"]), int(o["seq-len"]), int(o["calib-tokens"]),
                                          ctx.seed, ctx.data_root)
            hessians = linears.collect_hessians(model, batches, paths)
        relative = o["metric"] == "relative"
        measured = sorted({b for b in allowed if b is not None})
        for i, path in enumerate(paths):
            err: dict[int | None, float] = {b: 0.0 for b in allowed}
            h = None if hessians is None else hessians.get(path)
            if measure_them and h is not None:
                err, energy = linears.errors(linears.linear(model, path).weight, h, measured, group, sym,
                                             str(o["algo"]), **self._gptq_opts())
                if relative and energy > 0:
                    err = {b: e / energy for b, e in err.items()}
            params = linears.linear_params(model, path)
            items.append(Item(-1, i, tuple(
                Choice(b, params * (16 if b is None else b) if by_avg
                       else linears.linear_bytes(model, path, b, group, sym), err.get(b, 0.0))
                for b in allowed
            )))
        return dict.fromkeys(paths), hessians

    def _gptq(self, model: MoEModel, ctx: PassContext, group: int, sym: bool) -> ExpertGPTQ:
        """Per-slot Hessians from the calibration data (one pass through the float model)."""
        o = self.opts
        batches = calibration_batches(model, tuple(o["calib"]), int(o["seq-len"]), int(o["calib-tokens"]), ctx.seed,
                                      ctx.data_root)
        hessians, _ = collect_hessians(model, batches, all_experts=bool(o["calibrate-all-experts"]))
        return ExpertGPTQ(model, hessians, group, sym, act_order=bool(o["act-order"]), damp=float(o["damp"]),
                          search=self._search())

    def _gptq_opts(self) -> dict[str, Any]:
        return {"act_order": bool(self.opts["act-order"]), "damp": float(self.opts["damp"]), "search": self._search()}

    def _search(self) -> frozenset[int]:
        return scale_search(self.opts)

    def _algo_key(self) -> str:
        """What the sensitivity's quantized experts depend on besides the format (its cache key)."""
        o = self.opts
        half = "" if o["scale-dtype"] == "float32" else f"@{o['scale-dtype']}"  # rounded scales quantize differently
        if o["algo"] == "rtn":
            return ("rtn" if o["scales"] == "auto" else f"rtn(scales={o['scales']})") + half
        return half + (f"gptq(scales={o['scales']},act-order={o['act-order']},damp={o['damp']},"
                f"all-experts={o['calibrate-all-experts']},"
                f"tokens={o['calib-tokens']},seq-len={o['seq-len']})")

    def _sensitivity(
        self, model: MoEModel, ctx: PassContext, bits: list[int], group: int, sym: bool, gq: ExpertGPTQ | None = None
    ) -> Sensitivity:
        """The cached analysis when it was measured with the same settings, else measure it now."""
        o = self.opts
        source = ";".join(o["calib"]) or "random tokens"
        algo = self._algo_key()
        if o["sensitivity"] == "fisher":
            algo = f"fisher:{algo}"
        cached = ctx.analyses.peek(SENSITIVITY)
        if isinstance(cached, Sensitivity) and cached.matches(model, source, group, sym, bits, algo):
            return cached
        batches = calibration_batches(model, tuple(o["calib"]), int(o["seq-len"]), int(o["calib-tokens"]), ctx.seed,
                                      ctx.data_root)
        if o["sensitivity"] == "fisher":
            sens = fisher_sensitivity(model, batches, bits, group=group, symmetric=sym, search=self._search(),
                                      quantizer=None if gq is None else gq.dequantized, source=source,
                                      algo=algo.removeprefix("fisher:"))
            ctx.analyses.put(SENSITIVITY, sens)
            return sens
        sens = measure(model, batches, bits, group=group, symmetric=sym, max_rows=int(o["max-rows"]),
                       seed=ctx.seed, source=source, progress=sys.stderr.isatty(),
                       quantizer=None if gq is None else gq.dequantized, algo=algo, search=self._search())
        ctx.analyses.put(SENSITIVITY, sens)
        return sens


def calibration_batches(
    model: MoEModel, specs: tuple[str, ...], seq_len: int, max_tokens: int, seed: int, data_root: Path | None = None
) -> list[torch.Tensor]:
    """(B, T) token batches from the calibration sets (sharing max_tokens), or seeded random tokens.

    `app:NAME` specs read `data_root` (the pipeline's `--data`), as the importance pass does.
    """
    if specs:
        from moeopt.passes.importance import calibration_sets

        sets = calibration_sets(model, specs, seq_len, max(seq_len, max_tokens // len(specs)), data_root)
        return [b for cs in sets for b in cs.batches]
    vocab = int(model.config.get_text_config().vocab_size)
    n = max(1, max_tokens // seq_len)
    ids = torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(seed))
    return list(ids.split(8))


def shared_slot_matrices(
    model: MoEModel, chosen: list[tuple[int, int, int | None]], group: int, sym: bool, gq: ExpertGPTQ | None,
    search: Search = False,
) -> list[dict[str, Quantized] | None] | None:
    """Distributed runs: each chosen (layer, slot, bits)'s packed matrices, computed on one rank and
    all-gathered (None in one process, where `quantize_slot` computes them in place).

    Slot i goes to rank i % P, the rank that measured its GPTQ sensitivity and cached its matrices. The
    packed form is what `quantize_slot` would compute (`dequantize(quantize(w))` is bit-identical to its
    round-to-nearest path), so every rank stores the same bytes as one process.
    """
    if distributed.world() == 1:
        return None

    def one(c: tuple[int, int, int | None]) -> dict[str, Quantized] | None:
        li, s, b = c
        if b is None:
            return None
        if gq is not None:
            return {n: gq.matrix(li, s, n, b) for n in ("w_in", "w_out")}
        t = model.layers[li].table
        return {n: quantize(getattr(t, n)[s], b, group, sym, searched(search, b)) for n in ("w_in", "w_out")}

    packed = distributed.map_items(chosen, one)
    if gq is not None:  # GPTQ's fallbacks happened on the ranks that ran it: every rank reports them all
        gq.singular.update(*distributed.all_gather(gq.singular))
    return packed


def _lookup(packed: dict[str, Quantized] | None, name: str, bits: int) -> Quantized:
    assert packed is not None
    return packed[name]


def gptq_fallbacks(gq: ExpertGPTQ, bits: list[list[int | None]], ctx: PassContext) -> int:
    """Quantized slots that GPTQ rounded to nearest (no calibration rows, or a singular Hessian); warns."""
    unrouted = [(li, s) for li, s in gq.unrouted if bits[li][s] is not None]
    singular = sorted({(li, s) for li, s, _ in gq.singular if bits[li][s] is not None} - set(unrouted))
    for cells, why in (
        (unrouted, "no calibration tokens were routed to them (calibrate-all-experts=true sends every token to "
                   "every expert)"),
        (singular, "their Hessian could not be factorised even with raised damping"),
    ):
        if cells:
            where = ", ".join(f"{li}:{s}" for li, s in cells[:8]) + (" ..." if len(cells) > 8 else "")
            msg = f"{len(cells)} expert(s) (layer:slot {where}) rounded to nearest instead of GPTQ: {why}"
            ctx.log(f"quantize: warning: {msg}")
            warnings.warn(msg, RTNFallbackWarning, stacklevel=2)  # seen where no log is attached (the CLI)
    return len(unrouted) + len(singular)
