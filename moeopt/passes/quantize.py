"""`quantize`: per-expert bitwidths under a byte or average-bits budget, group-wise integer quantization.

Methods: `ilp` (optimal multiple-choice knapsack over measured sensitivities), `greedy` (EdgeMoE's
lowering by sensitivity) and `uniform` (every expert at `bits`). Only routed experts are quantized;
attention, embeddings, shared experts and lm_head stay float (not implemented here).

Pins fix chosen experts: `pin=LAYER:SLOT@BITS;...` where LAYER and SLOT are numbers or `*` and BITS is
2, 3, 4, 8 or `float`; `pin=0@8` pins every slot of layer 0, later entries win. Example:
`quantize{avg-bits=3,pin=0:*@8;*:0@float}`. Slots are physical slots (= expert ids before pruning).

After the pass: `slot.bits` is set, `table.quantized` holds the packed MatMulNBits-layout matrices,
and `w_in` / `w_out` hold their dequantized values (the reference numerics).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

from moeopt.errors import BadInputError, InfeasibleBudgetError
from moeopt.ir.model import MoEModel
from moeopt.passes.base import Pass, PassContext, PassResult
from moeopt.passes.options import Option
from moeopt.passes.registry import register
from moeopt.quant.allocate import Choice, Item, solve_greedy, solve_ilp, solve_uniform, total
from moeopt.quant.apply import quantize_slot, slot_bytes, slot_params
from moeopt.quant.groupwise import BITS, GROUPS
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
        Option("metric", "choice", "mse", "sensitivity: routing-weighted output MSE, or relative to each layer's "
               "expert output energy (weighs layers alike)", choices=("mse", "relative")),
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

    def call(self, model: MoEModel, ctx: PassContext) -> PassResult:
        o = self.opts
        group, sym, method = int(o["group"]), bool(o["symmetric"]), str(o["method"])
        pins = parse_pins(tuple(o["pin"]), model)
        if method == "uniform":
            cands: list[int | None] = [parse_bits(str(o["bits"]))]
        else:
            cands = list(dict.fromkeys(parse_bits(str(c)) for c in o["candidates"]))
        need_sens = method != "uniform"
        measured = sorted({b for b in [*cands, *pins.values()] if b is not None})  # pins may name other bits
        sens = self._sensitivity(model, ctx, measured, group, sym) if need_sens else None
        by_avg = o["avg-bits"] is not None
        relative = o["metric"] == "relative"
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
        capacity = self._capacity(model)
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
        for it, p in zip(items, picks, strict=True):
            bits[it.layer][it.slot] = it.choices[p].bits
            quantize_slot(model.layers[it.layer].table, it.slot, it.choices[p].bits, group, sym)
        report = QuantReport(
            method=method, group=group, symmetric=sym, bits=bits,
            layer_bytes=[layer.table.expert_bytes() for layer in model.layers],
            float_bytes=sum(slot_params(layer.table) * 2 * layer.table.num_slots for layer in model.layers),
            params=sum(slot_params(layer.table) * layer.table.num_slots for layer in model.layers),
            capacity=capacity, unit="bit-params" if by_avg else "B", error=total(items, picks)[1], pinned=len(pins),
        )
        if not by_avg and capacity is not None and report.total_bytes > capacity:  # the cost model is wrong
            raise RuntimeError(f"stored {report.total_bytes:,} B exceed the budget {capacity:,} B")
        ctx.analyses.put(REPORT, report)
        ctx.log(report.summary())
        quantized = sum(b is not None for row in bits for b in row)
        if quantized and model.storage_dtype != "float32":
            # A half-precision checkpoint would round the fp32 scales and the dequantized weights (whose
            # (q - zp) * scale products need more mantissa than fp16 has), so save/load would not be exact.
            ctx.log(f"quantize: checkpoint storage dtype {model.storage_dtype} -> float32 (exact scales)")
            model.storage_dtype = "float32"
        # Weights changed, so every routing/importance analysis downstream is stale; keep only our report.
        return PassResult(model, quantized > 0, frozenset({REPORT}), report.stats())

    def _capacity(self, model: MoEModel) -> int | None:
        o = self.opts
        if o["budget"] is not None:
            return int(o["budget"])
        if o["avg-bits"] is not None:
            params = sum(slot_params(layer.table) * layer.table.num_slots for layer in model.layers)
            return int(float(o["avg-bits"]) * params)
        return None

    def _sensitivity(
        self, model: MoEModel, ctx: PassContext, bits: list[int], group: int, sym: bool
    ) -> Sensitivity:
        """The cached analysis when it was measured with the same settings, else measure it now."""
        o = self.opts
        source = ";".join(o["calib"]) or "random tokens"
        cached = ctx.analyses.peek(SENSITIVITY)
        if isinstance(cached, Sensitivity) and cached.matches(model, source, group, sym, bits):
            return cached
        batches = calibration_batches(model, tuple(o["calib"]), int(o["seq-len"]), int(o["calib-tokens"]), ctx.seed,
                                      ctx.data_root)
        sens = measure(model, batches, bits, group=group, symmetric=sym, max_rows=int(o["max-rows"]),
                       seed=ctx.seed, source=source, progress=sys.stderr.isatty())
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
