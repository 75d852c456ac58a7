"""The streamed parity reference and, in the same layer sweep, its measured error model (`lower.tolerance`).

The in-memory lowering states its parity tolerance as max(FLOOR, factor x D), D the max |logit diff| that
PyTorch shows on the parity probe when the artifact kernels' numerics are simulated at every matmul
(`moeopt.lower.tolerance`). A streamed compile cannot run that whole-model forward, and a second streamed
sweep would read every expert of the checkpoint again (22 GB on the 8x7B-shaped bench model). So the
teacher-forced sweep of `compile._parity` carries two hidden states, the clean one and the simulated one,
through each layer while its weights are loaded:

1. the decoder layer runs on each state with its routed experts replaced by a recorder that returns zeros
   (the layer's output is then its residual alone: Mixtral adds the MoE output last), the simulated state
   under the same linear-input perturbations `tolerance._perturbed` applies;
2. each slot used by either state is made once (`skeleton.LazySlots`) and `compute.routed_experts` runs
   on that slot alone for the clean state, then for the simulated one (its inputs perturbed as
   `tolerance._perturbed` perturbs them); the per-slot outputs are summed in ascending slot order, which
   is the additions `routed_experts` itself makes, so the clean state stays bit-identical to
   `StreamSkeleton.forward_layer`.

The perturbations, their order (the fp32-order noise draws from one generator in the whole-model forward's
call order), the factors and the floor are the in-memory rule's, so the streamed manifest's
``parity_rule`` is the one the in-memory lowering of the same pipeline records.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

import moeopt.ir.compute as compute
from moeopt.lower.onnx_quant import QuantSettings
from moeopt.lower.tolerance import _perturbed, perturbations, stated


class Simulation:
    """The kernels' numerics to simulate, chosen as `tolerance.parity_tolerance` chooses them
    (`tolerance.perturbations`)."""

    def __init__(self, model: Any, quant: QuantSettings) -> None:
        self.kind, self.factor, self.linear, self.slot, self.counts = perturbations(model, quant)

    def rule(self, simulated: float) -> tuple[float, dict[str, Any]]:
        """(tolerance, the manifest's ``parity_rule``) for the simulated max |logit diff|."""
        return stated(self.kind, self.factor, simulated, self.counts)

    def linears(self, model: Any) -> contextlib.AbstractContextManager[None]:
        """Inside: the simulated state's linear inputs perturbed."""
        return _perturbed(model, self.linear, {})

    def slot_of(self, model: Any, i: int, s: int) -> contextlib.AbstractContextManager[None]:
        """Inside: slot s of layer i perturbed (its weights are made here if not yet: `LazySlots`)."""
        fn = self.slot.get((i, s))
        return contextlib.nullcontext() if fn is None else _perturbed(model, {}, {(i, s): fn})


def dual_layer(sk: Any, i: int, h: torch.Tensor, h_sim: torch.Tensor,
               sim: Simulation) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder layer i (weights loaded, experts lazy) on the clean and the simulated hidden states, each expert
    made once (see the module docstring). Returns the two outputs; the clean one is `forward_layer`'s bits."""
    routed = compute.routed_experts
    calls: list[tuple[Any, ...]] = []

    def record(x: torch.Tensor, *args: Any) -> torch.Tensor:
        calls.append((x, *args))
        return torch.zeros_like(x)

    compute.routed_experts = record  # type: ignore[assignment]  # moe_compute looks it up at call time
    try:
        base = sk.forward_layer(i, h)
        with sim.linears(sk.model):
            base_sim = sk.forward_layer(i, h_sim)
    finally:
        compute.routed_experts = routed  # type: ignore[assignment]
    if len(calls) != 2:
        raise RuntimeError(f"layer {i}: {len(calls)} routed-expert calls in two forwards, expected 2")
    outs = [torch.zeros_like(calls[0][0]), torch.zeros_like(calls[1][0])]
    used = sorted({int(s) for c in calls for s in torch.unique(c[1][c[1] >= 0]).tolist()})
    with torch.no_grad():
        for s in used:
            for k, (x, idx, *rest) in enumerate(calls):
                if not bool((idx == s).any()):
                    continue
                only = torch.where(idx == s, idx, torch.full_like(idx, -1))
                with contextlib.nullcontext() if k == 0 else sim.slot_of(sk.model, i, s):
                    outs[k] = outs[k] + routed(x, only, *rest)
    return base + outs[0].reshape(base.shape), base_sim + outs[1].reshape(base_sim.shape)
