"""GPTQ for routed experts: per-slot Hessians from calibration data, and the quantized matrices.

Each physical slot gets two Hessians (`gptq.Hessian`): one over the layer inputs routed to it (for
`w_in`, gate and up rows together: they read the same input), one over its intermediate activations
`act(gate x) * up x` on those inputs (for `w_out`). With `all_experts` every calibration token goes
through every expert for the Hessians, as llm-compressor's `calibrate_all_experts` does, so rarely
routed experts get enough rows; the model's output (and so every later layer's input) still follows the
real routing. Then every slot's `w_in` Hessian is the layer's, so it is stored once per layer.

Where the inputs come from, honestly: ONE calibration pass through the FLOAT model. Every layer's
Hessians are measured with all layers in float (not sequentially, layer after layer, on the outputs of
already-quantized layers as the GPTQ paper does), and `w_out`'s Hessian comes from the float `w_in`'s
intermediate activations, not from the quantized `w_in`'s. This costs one forward pass instead of one
per layer and keeps the slots independent (any order, any bitwidth per slot, cacheable per bitwidth for
the allocation), at the price of not compensating the drift earlier quantized layers cause.

Memory: float64 Hessians, (H^2 + I^2) * 8 bytes per slot (H^2 once per layer with all_experts).

A slot with no calibration rows has no Hessian; it is rounded to nearest (RTN) and listed in
`ExpertGPTQ.unrouted` (the quantize pass warns and counts the ones it quantizes). A matrix whose
Hessian cannot be factorised even with raised damping is rounded too (`ExpertGPTQ.singular`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from moeopt import distributed
from moeopt.ir.compute import RoutingTrace, expert_hidden
from moeopt.ir.layer import MoELayer
from moeopt.ir.model import MoEModel
from moeopt.quant.gptq import GPTQFallbackWarning, Hessian, all_reduce_hessians, gptq
from moeopt.quant.groupwise import Quantized, Search, dequantize, quantize, searched
from moeopt.quant.sensitivity import run_observed


class RTNFallbackWarning(UserWarning):
    """Quantized experts were rounded to nearest instead of GPTQ (no calibration rows, or singular)."""


@dataclass
class SlotHessians:
    """The two Hessians of one slot and how many calibration rows the router sent to it."""

    w_in: Hessian  # over the hidden size H (shared by a layer's slots with all_experts)
    w_out: Hessian  # over the intermediate size I
    routed: int = 0


def collect_hessians(
    model: MoEModel, batches: Sequence[torch.Tensor], *, all_experts: bool = False
) -> tuple[list[list[SlotHessians]], int]:
    """Run the float model on (B, T) token batches; per layer and slot, the Hessians (see the module
    docstring) and the tokens run."""
    out: list[list[SlotHessians]] = []
    for layer in model.layers:
        t = layer.table
        shared = Hessian(t.spec.hidden) if all_experts else None
        out.append([SlotHessians(shared if shared is not None else Hessian(t.spec.hidden), Hessian(t.w_out.shape[-1]))
                    for _ in range(t.num_slots)])

    def observe(layer: MoELayer, trace: RoutingTrace) -> None:
        t, spec = layer.table, layer.table.spec
        x = trace.hidden.detach().float()  # (N, H)
        slot_idx = t.slot_of[trace.index]  # (N, k)
        cells = out[layer.index]
        if all_experts and cells:
            cells[0].w_in.add(x)  # the one shared Hessian
        gram: torch.Tensor | None = None  # x^T x of the whole batch, for the slots every row reached
        for s, cell in enumerate(cells):
            rows = (slot_idx == s).any(dim=-1)  # (N,)
            n = int(rows.sum())
            cell.routed += n
            xs = x if all_experts or n == x.shape[0] else x[rows]
            if xs.shape[0] == 0:
                continue
            if not all_experts and n == x.shape[0]:  # e.g. top-k = E: one product serves every such slot
                if gram is None:
                    x64 = x.to(torch.float64)
                    gram = x64.t() @ x64
                cell.w_in.add_gram(gram, n)
            elif not all_experts:
                cell.w_in.add(xs)
            b_in = None if t.b_in is None else t.b_in[s].float()
            cell.w_out.add(expert_hidden(xs, t.w_in[s].float(), b_in, spec.act, spec.glu, spec))

    # Distributed (moeopt.distributed): each rank runs its share of the batches, the sums are all-reduced.
    tokens = distributed.local(lambda: run_observed(model, distributed.shard(batches), observe))
    if distributed.world() > 1:
        cells = [c for row in out for c in row]
        counts = torch.tensor([float(c.routed) for c in cells] + [float(tokens)], dtype=torch.float64)
        distributed.all_reduce_([counts])
        for c, n in zip(cells, counts.tolist(), strict=False):
            c.routed = int(n)
        tokens = int(counts[-1].item())
        for row in out:  # layer by layer: one layer's Hessians in the collective's buffer at a time
            all_reduce_hessians([h for c in row for h in (c.w_in, c.w_out)])
    return out, tokens


@dataclass
class ExpertGPTQ:
    """GPTQ results of a model's slots at each asked bitwidth, computed once and cached.

    `matrix(...)` is what the quantize pass stores; `dequantized(...)` what the sensitivity analysis
    measures, so the allocation and the stored weights agree.
    """

    model: MoEModel
    hessians: list[list[SlotHessians]]
    group: int
    symmetric: bool
    act_order: bool = True
    damp: float = 0.01
    search: Search = False  # scale search (groupwise.search_params) instead of min/max, at these widths
    _cache: dict[tuple[int, int, str, int], Quantized] = field(default_factory=dict)
    singular: set[tuple[int, int, str]] = field(default_factory=set)

    @property
    def unrouted(self) -> list[tuple[int, int]]:
        """(layer, slot) of the slots without calibration rows (rounded to nearest)."""
        return [(li, s) for li, row in enumerate(self.hessians) for s, c in enumerate(row) if c.w_in.count == 0]

    def matrix(self, layer: int, slot: int, name: str, bits: int) -> Quantized:
        """Slot `slot`'s `name` ("w_in" / "w_out") of MoE layer `layer` at `bits`, from the table's weights,
        which must still be float the first time a (slot, name, bits) is asked (later calls are cached)."""
        key = (layer, slot, name, bits)
        if key not in self._cache:
            w = getattr(self.model.layers[layer].table, name)[slot].float()
            cell = self.hessians[layer][slot]
            if cell.w_in.count == 0:
                self._cache[key] = quantize(w, bits, self.group, self.symmetric, searched(self.search, bits))
            else:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", GPTQFallbackWarning)
                    self._cache[key] = gptq(w, getattr(cell, name).value(), bits, self.group, self.symmetric,
                                            act_order=self.act_order, damp=self.damp,
                                            search=searched(self.search, bits))
                if any(issubclass(c.category, GPTQFallbackWarning) for c in caught):
                    self.singular.add((layer, slot, name))
        return self._cache[key]

    def dequantized(self, layer: int, slot: int, name: str, bits: int) -> torch.Tensor:
        return dequantize(self.matrix(layer, slot, name, bits))
