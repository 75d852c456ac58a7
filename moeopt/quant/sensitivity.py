"""Per-expert quantization sensitivity on calibration data (EdgeMoE: quantize one expert at a time).

For layer l, slot s and bitwidth b the error is the routing-weighted squared error that quantizing that
one expert adds to the layer output, per calibration token:

    err[l][s][b] = (1 / T) * sum over tokens t routed to s of  w_ts^2 * mean_h (E_b(x_t) - E(x_t))^2

where w_ts is the token's routing weight for the slot and T the number of tokens. Frequent, heavily
weighted experts therefore count more, and the errors of different experts add up (ignoring cross terms),
which is what the allocation's objective assumes. `energy[l]`, the same sum over (E(x_t))^2, turns it
into a relative error (`error(..., relative=True)`) that weighs every layer alike. Each slot's inputs
are subsampled to `max_rows`; the sum is rescaled by (routed rows / sampled rows).

E_b is the expert as the quantize pass would store it at b bits: `quantizer` (the pass gives GPTQ's
result when algo=gptq, so the allocation weighs the error of the algorithm actually used), or
round-to-nearest by default. `Sensitivity.algo` names it, and a cached analysis only answers for the
same algorithm.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from moeopt import distributed
from moeopt.ir.compute import RoutingTrace, _dense
from moeopt.ir.layer import MoELayer, Observer
from moeopt.ir.model import MoEModel
from moeopt.quant.groupwise import Search, fake_quantize, searched


@dataclass
class SlotInputs:
    """Inputs routed to one slot: sampled rows, their routing weights, and how many rows there were."""

    x: torch.Tensor  # (n, H) sampled inputs
    w: torch.Tensor  # (n,) routing weight of each sampled row
    routed: int  # rows routed to the slot in all the calibration data (>= n)


@dataclass
class Sensitivity:
    """errors[l][s][bits] (bits None = float, error 0), freq[l][s] = share of tokens routed to slot s."""

    group: int
    symmetric: bool
    tokens: int
    errors: list[list[dict[int | None, float]]]
    freq: list[list[float]]
    source: str = ""  # what calibration data it was measured on
    energy: list[float] | None = None  # per layer: routing-weighted mean squared expert output per token
    algo: str = "rtn"  # how E_b was quantized (see the module docstring)

    def error(self, layer: int, slot: int, bits: int | None, relative: bool = False) -> float:
        """err[layer][slot][bits], or divided by the layer's output energy when relative."""
        err = self.errors[layer][slot][bits]
        if not relative:
            return err
        if self.energy is None:
            raise ValueError("relative errors need the per-layer output energy")
        return err / self.energy[layer] if self.energy[layer] > 0 else err

    def matches(
        self, model: MoEModel, source: str, group: int, symmetric: bool, bits: Sequence[int], algo: str = "rtn"
    ) -> bool:
        """Whether this analysis answers for `model` at these settings (the cache key of the quantize pass)."""
        shape = [len(row) for row in self.errors] == [layer.table.num_slots for layer in model.layers]
        have = all(b in cell for row in self.errors for cell in row for b in bits)
        key = (self.source, self.group, self.symmetric, self.algo)
        return shape and have and key == (source, group, symmetric, algo)


def calibration_forwards(model: MoEModel, batches: Iterable[torch.Tensor]) -> int:
    """Run the model on (B, T) token batches without gradients; returns the tokens run.

    Checkpoints saved from training keep output_router_logits=True; canonical layers expose no router
    logits, so the host model's load-balancing loss would fail. Calibration only needs what hooks and
    observers see, so it is switched off for the run.
    """
    tokens = 0
    router_logits = getattr(model.config, "output_router_logits", None)
    if router_logits:
        model.config.output_router_logits = False
    try:
        with torch.no_grad():
            for ids in batches:
                model.logits(ids)
                tokens += int(ids.numel())
    finally:
        if router_logits:
            model.config.output_router_logits = router_logits
    return tokens


def run_observed(model: MoEModel, batches: Iterable[torch.Tensor], observe: Observer) -> int:
    """Run the model on (B, T) token batches with `observe` seeing every MoE layer's routing; the tokens run."""
    for layer in model.layers:
        layer.observers.append(observe)
    try:
        return calibration_forwards(model, batches)
    finally:
        for layer in model.layers:
            layer.observers.remove(observe)


def collect_inputs(
    model: MoEModel, batches: Iterable[torch.Tensor], *, max_rows: int = 512, seed: int = 0
) -> tuple[list[list[SlotInputs]], int]:
    """Run the model on (B, T) token batches and keep, per layer and slot, the inputs routed there."""
    xs: list[list[list[torch.Tensor]]] = [[[] for _ in range(lay.table.num_slots)] for lay in model.layers]
    ws: list[list[list[torch.Tensor]]] = [[[] for _ in range(lay.table.num_slots)] for lay in model.layers]

    def observe(layer: MoELayer, trace: RoutingTrace) -> None:
        slot_idx = layer.table.slot_of[trace.index]  # (N, k)
        for s in range(layer.table.num_slots):
            hit = slot_idx == s  # (N, k)
            rows = hit.any(dim=-1)  # (N,)
            if rows.any():
                xs[layer.index][s].append(trace.hidden[rows].detach().float())
                ws[layer.index][s].append(torch.where(hit, trace.weights, 0.0).sum(-1)[rows].detach().float())

    tokens = distributed.local(lambda: run_observed(model, distributed.shard(list(batches)), observe))
    if distributed.world() > 1:
        return _gather_inputs(model, xs, ws, tokens, max_rows, seed)
    gen = torch.Generator().manual_seed(seed)
    out: list[list[SlotInputs]] = []
    for li, layer in enumerate(model.layers):
        per_slot = []
        hid = layer.table.spec.hidden
        for s in range(layer.table.num_slots):
            x = torch.cat(xs[li][s]) if xs[li][s] else torch.zeros(0, hid)  # (n, H)
            w = torch.cat(ws[li][s]) if ws[li][s] else torch.zeros(0)  # (n,)
            n = x.shape[0]
            if n > max_rows:
                keep = torch.randperm(n, generator=gen)[:max_rows]
                x, w = x[keep], w[keep]
            per_slot.append(SlotInputs(x, w, n))
        out.append(per_slot)
    return out, tokens


def _gather_inputs(
    model: MoEModel, xs: list[list[list[torch.Tensor]]], ws: list[list[list[torch.Tensor]]], tokens: int,
    max_rows: int, seed: int,
) -> tuple[list[list[SlotInputs]], int]:
    """Distributed `collect_inputs`: the rows one process would keep, from the ranks' shards.

    Ranks hold contiguous shards, so rank r's rows of a slot are rows [off_r, off_r + n_r) of the single-
    process concatenation. Every rank replays the same subsampling (same generator, same totals) and
    sends only the kept rows it holds; all-gathered, they are placed where one process would have them.
    """
    local = [[(torch.cat(xs[li][s]) if xs[li][s] else torch.zeros(0, lay.table.spec.hidden),
               torch.cat(ws[li][s]) if ws[li][s] else torch.zeros(0)) for s in range(lay.table.num_slots)]
             for li, lay in enumerate(model.layers)]
    sizes = distributed.all_gather([[int(x.shape[0]) for x, _ in row] for row in local])  # [rank][layer][slot]
    me = distributed.rank()
    gen = torch.Generator().manual_seed(seed)
    keeps: list[list[torch.Tensor]] = []
    picked: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = []  # (positions, x, w) held here
    for li, row in enumerate(local):
        keeps.append([])
        picked.append([])
        for s, (x, w) in enumerate(row):
            n = sum(r[li][s] for r in sizes)
            keep = torch.randperm(n, generator=gen)[:max_rows] if n > max_rows else torch.arange(n)
            off = sum(r[li][s] for r in sizes[:me])
            pos = ((keep >= off) & (keep < off + x.shape[0])).nonzero().flatten()  # places in `keep` held here
            keeps[-1].append(keep)
            picked[-1].append((pos, x[keep[pos] - off], w[keep[pos] - off]))
    parts = distributed.all_gather(picked)
    out: list[list[SlotInputs]] = []
    for li, layer in enumerate(model.layers):
        per_slot = []
        for s, keep in enumerate(keeps[li]):
            x = torch.zeros(len(keep), layer.table.spec.hidden)  # (kept, H)
            w = torch.zeros(len(keep))
            for part in parts:
                pos, px, pw = part[li][s]
                x[pos], w[pos] = px, pw
            per_slot.append(SlotInputs(x, w, sum(r[li][s] for r in sizes)))
        out.append(per_slot)
    return out, sum(int(t) for t in distributed.all_gather(tokens))


# (layer index, slot, "w_in" | "w_out", bits) -> the dequantized matrix the model would compute with
Quantizer = Callable[[int, int, str, int], torch.Tensor]


def expert_errors(
    layer: MoELayer, slot: int, inputs: SlotInputs, bits: Sequence[int], group: int, symmetric: bool, tokens: int,
    quantizer: Quantizer | None = None, search: Search = False,
) -> tuple[dict[int | None, float], float]:
    """(err[b] for one slot (see the module docstring; float (None) is 0), the slot's output energy)."""
    t, spec = layer.table, layer.table.spec
    out: dict[int | None, float] = {None: 0.0}
    x, w = inputs.x, inputs.w
    if x.shape[0] == 0:  # never routed on the calibration data: weight-space error as a tie-breaker
        x, w, routed = torch.randn(16, spec.hidden, generator=torch.Generator().manual_seed(slot)), torch.ones(16), 1
    else:
        routed = inputs.routed
    b_in = None if t.b_in is None else t.b_in[slot].float()
    b_out = None if t.b_out is None else t.b_out[slot].float()
    w_in, w_out = t.w_in[slot].float(), t.w_out[slot].float()  # (F, H), (H, I)
    with torch.no_grad():
        ref = _dense(x, w_in, w_out, b_in, b_out, spec.act, spec.glu, spec)  # (n, H)
        energy = float((ref.pow(2).mean(-1) * w.pow(2)).sum()) * routed / x.shape[0] / max(tokens, 1)
        energy = energy if inputs.x.shape[0] else 0.0  # random stand-in inputs carry no real output
        for b in bits:
            if quantizer is None:
                qi = fake_quantize(w_in, b, group, symmetric, searched(search, b))
                qo = fake_quantize(w_out, b, group, symmetric, searched(search, b))
            else:
                qi, qo = quantizer(layer.index, slot, "w_in", b), quantizer(layer.index, slot, "w_out", b)
            y = _dense(x, qi, qo, b_in, b_out, spec.act, spec.glu, spec)  # (n, H)
            per_row = (y - ref).pow(2).mean(-1) * w.pow(2)  # (n,)
            out[b] = float(per_row.sum()) * routed / x.shape[0] / max(tokens, 1)
    return out, energy


def measure(
    model: MoEModel, batches: Sequence[torch.Tensor], bits: Sequence[int], *, group: int, symmetric: bool,
    max_rows: int = 512, seed: int = 0, source: str = "", progress: bool = False,
    quantizer: Quantizer | None = None, algo: str = "rtn", search: Search = False,
) -> Sensitivity:
    """The sensitivity of every slot of every layer to every bitwidth in `bits`."""
    inputs, tokens = collect_inputs(model, batches, max_rows=max_rows, seed=seed)
    errors: list[list[dict[int | None, float]]] = []
    freq: list[list[float]] = []
    work = [(li, s) for li, layer in enumerate(model.layers) for s in range(layer.table.num_slots)]
    for li, layer in enumerate(model.layers):
        errors.append([{} for _ in range(layer.table.num_slots)])
        freq.append([inputs[li][s].routed / max(tokens, 1) for s in range(layer.table.num_slots)])
    energy = [0.0] * len(model.layers)
    from tqdm import tqdm

    bar = tqdm(total=len(range(distributed.rank(), len(work), distributed.world())), desc="quantize: sensitivity",
               unit="expert", leave=False, disable=not progress)

    def one(cell: tuple[int, int]) -> tuple[dict[int | None, float], float]:
        li, s = cell
        res = expert_errors(model.layers[li], s, inputs[li][s], bits, group, symmetric, tokens, quantizer, search)
        bar.update(1)
        return res

    # Distributed: slot i on rank i % P (the quantize pass stores each slot on the rank that measured it).
    with bar:
        results = distributed.map_items(work, one)
    for (li, s), (err, e) in zip(work, results, strict=True):
        errors[li][s] = err
        energy[li] += e
    return Sensitivity(group, symmetric, tokens, errors, freq, source, energy, algo)
