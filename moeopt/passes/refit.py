"""`layer-io` (analysis) and `refit` (transform): fit the experts left after pruning and merging so that
each MoE layer reproduces the source layer's output on calibration data.

Merging averages experts that compute different functions; on the reference model at keep 0.3 (two
slots per layer), the merged layers' outputs on an app's data are as far from the source's as the
outputs themselves (relative squared error 0.3-1.2). That is the error an adapter tuned on the proxy
learns to work around, and then meets no longer when it is plugged into the foundation. `refit` takes
the layer-wise reconstruction objective of post-training compression work: with the source layer's
inputs X and outputs Y recorded by `layer-io` before anything was removed, it minimises
||layer(X) - Y||^2 over the kept slots' weights, one layer at a time, with the router, the keep mask and
the slot map fixed, so routing and every non-expert weight stay as they were and adapters still plug
into the foundation. A layer that still holds every expert in its own slot is exact and left alone.
By default (`inputs=source`) every layer is fitted on the source's recorded inputs; with `inputs=model`
layer i is fitted on the inputs this model now gives it, with the layers before it already refitted, so
that it also corrects what they still get wrong. In an in-process experiment on the held-out
opinion-sentiment app (keep 0.3, 1000 LoRA steps) adapters tuned on `inputs=source` proxies transferred
at least as well (foundation + adapter 0.604 mean test accuracy over 3 seeds, against 0.591 over 2 seeds
with `inputs=model` and 0.581 over 3 without refit), so it is the default. `bench/apps.py` over three
seeds: 0.627 with refit, 0.596 without, 0.643 for the adapter tuned on the foundation itself.

    layer-io{calib=app:intent},prune{keep=0.3},match,merge,refit

`layer-io` describes the source model, not the model being transformed, so later transforms keep it
(`SOURCE_RECORDS` in `moeopt.passes.base`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from moeopt.errors import BadInputError
from moeopt.ir.layer import MoELayer
from moeopt.ir.model import MoEModel
from moeopt.passes.base import ALL, LAYER_IO, Pass, PassContext, PassResult
from moeopt.passes.importance import CALIB_OPTION, calibration_sets
from moeopt.passes.options import Option
from moeopt.passes.registry import register


@dataclass
class LayerIO:
    """Each MoE layer's inputs and outputs on the calibration tokens, (N, H) float32 each."""

    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    batches: list[torch.Tensor]  # the calibration token ids, (B, T) each: `refit{inputs=model}` reruns them

    @property
    def tokens(self) -> int:
        return int(self.inputs[0].shape[0]) if self.inputs else 0


def record_io(model: MoEModel, batches: list[torch.Tensor], *, progress: bool = False) -> LayerIO:
    """Run the model over `batches` ((B, T) token ids each) and keep every MoE layer's input and output."""
    ins: list[list[torch.Tensor]] = [[] for _ in model.layers]
    outs: list[list[torch.Tensor]] = [[] for _ in model.layers]

    def hook(layer: torch.nn.Module, args: tuple[torch.Tensor, ...], out: Any) -> None:
        i = int(layer.index)  # type: ignore[arg-type]
        h = args[0]
        out = out[0] if isinstance(out, tuple) else out  # tuple_output layers (gpt-oss)
        ins[i].append(h.detach().reshape(-1, h.shape[-1]).float().clone())
        outs[i].append(out.detach().reshape(-1, out.shape[-1]).float().clone())

    handles = [layer.register_forward_hook(hook) for layer in model.layers]
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="layer-io", disable=not progress, leave=False):
                model.hf(input_ids=batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return LayerIO([torch.cat(x) for x in ins], [torch.cat(y) for y in outs], list(batches))


class _Stop(Exception):
    """Raised by a hook to end a forward once the wanted layer's input is recorded."""


def layer_inputs(model: MoEModel, index: int, batches: list[torch.Tensor]) -> torch.Tensor:
    """(N, H) inputs of MoE layer `index` of `model` as it is now (earlier layers already refitted)."""
    got: list[torch.Tensor] = []

    def hook(layer: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        got.append(args[0].detach().reshape(-1, args[0].shape[-1]).float().clone())
        raise _Stop

    handle = model.layers[index].register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for batch in batches:
                with contextlib.suppress(_Stop):
                    model.hf(input_ids=batch, use_cache=False)
    finally:
        handle.remove()
    return torch.cat(got)


def relative_error(layer: MoELayer, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> float:
    """sum ||layer(x) - y||^2 / sum ||y||^2 over the recorded tokens."""
    num = den = 0.0
    with torch.no_grad():
        for s in range(0, x.shape[0], chunk):
            out = layer.moe(x[None, s:s + chunk])[0]
            num += float((out - y[s:s + chunk]).pow(2).sum())
            den += float(y[s:s + chunk].pow(2).sum())
    return num / max(den, 1e-30)


def is_exact(layer: MoELayer) -> bool:
    """Every expert kept, each in its own slot: the layer is the source's and there is nothing to fit."""
    t = layer.table
    return bool(t.keep_mask.all()) and all(len(info.members) == 1 for info in t.slots)


def fit_layer(layer: MoELayer, x: torch.Tensor, y: torch.Tensor, *, steps: int, lr: float, batch: int,
              seed: int) -> None:
    """Adam on the mean squared error of the layer's output over random token batches; weights in place."""
    t = layer.table
    params = [p for p in (t.w_in, t.w_out, t.b_in, t.b_out) if p is not None]
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    try:
        for _ in range(steps):
            idx = torch.randint(0, x.shape[0], (min(batch, x.shape[0]),), generator=gen)
            loss = (layer.moe(x[idx][None])[0] - y[idx]).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None


@register
class LayerIOPass(Pass):
    name = LAYER_IO
    kind = "analysis"
    summary = "record every MoE layer's inputs and outputs on calibration data (the source that refit fits to)"
    exact = True
    options = (
        CALIB_OPTION,
        Option("seq-len", "int", 128, "tokens per calibration sequence", min=8),
        Option("max-tokens", "int", 8192, "tokens per dataset at most (memory: 2 x tokens x hidden x 4 B a layer)",
               min=8),
        Option("progress", "bool", True, "show a progress bar"),
    )

    def call(self, model: MoEModel, ctx: PassContext) -> PassResult:
        sets = calibration_sets(model, self.opts["calib"], self.opts["seq-len"], self.opts["max-tokens"],
                                ctx.data_root)
        io = record_io(model, [b for cs in sets for b in cs.batches], progress=self.opts["progress"])
        ctx.analyses.put(LAYER_IO, io)
        return PassResult(model, False, ALL, {"datasets": len(sets), "tokens": io.tokens})


@register
class Refit(Pass):
    name = "refit"
    kind = "transform"
    summary = "fit each pruned or merged layer's kept experts to reproduce the source layer's recorded outputs"
    options = (
        Option("steps", "int", 300, "Adam steps per layer", min=1),
        Option("lr", "float", 1e-3, "Adam learning rate", min=0.0),
        Option("batch", "int", 1024, "tokens per step", min=1),
        Option("inputs", "choice", "source", "layer inputs fitted on: source (the source model's, recorded by "
               "layer-io) or model (this model's own, each layer after the earlier ones are refitted)",
               choices=("source", "model")),
        Option("seed", "int", 0, "seed of the token batches"),
    )

    def requires(self, model: MoEModel, ctx: PassContext) -> None:
        io = ctx.analyses.peek(LAYER_IO)
        if io is None:
            raise BadInputError("refit needs the source model's layer outputs: run `layer-io{calib=...}` "
                                "before prune and merge")
        if len(io.inputs) != len(model.layers):
            raise BadInputError(f"refit: layer-io recorded {len(io.inputs)} MoE layers, the model has "
                                f"{len(model.layers)}")
        if any(info.bits is not None for layer in model.layers for info in layer.table.slots):
            raise BadInputError("refit fits float experts: run it before quantize")

    def call(self, model: MoEModel, ctx: PassContext) -> PassResult:
        io: LayerIO = ctx.analyses.peek(LAYER_IO)
        o = self.opts
        fitted, before, after = 0, [], []
        for i, layer in enumerate(model.layers):
            if is_exact(layer):
                continue
            y = io.outputs[i]
            x = io.inputs[i] if o["inputs"] == "source" else layer_inputs(model, i, io.batches)
            before.append(relative_error(layer, x, y))
            fit_layer(layer, x, y, steps=o["steps"], lr=o["lr"], batch=o["batch"], seed=o["seed"] + i)
            after.append(relative_error(layer, x, y))
            fitted += 1
            ctx.log(f"refit: layer {i}: relative output error {before[-1]:.4f} -> {after[-1]:.4f}")
        stats: dict[str, float] = {"layers-fitted": fitted}
        if fitted:
            stats |= {"error-before": sum(before) / fitted, "error-after": sum(after) / fitted}
        # Routing, the router and every non-expert weight are unchanged: routing statistics stay valid.
        return PassResult(model, fitted > 0, frozenset({"importance", "sensitivity", "expert-classes", "matching"}),
                          stats)
