"""`importance` (analysis): routing statistics of every layer on calibration data.

Per layer and ORIGINAL expert: top-k frequency, mean router probability, SwapMoE's score (gate weight x
input norm x expert weight norm), co-activation counts, the correlation of router outputs between
experts (for matching), and a small sample of layer inputs (for output-similarity and merging). Computed
per dataset ("app") when several are given, and combined.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from moeopt import distributed
from moeopt.errors import BadInputError
from moeopt.ir.compute import RoutingTrace
from moeopt.ir.layer import MoELayer
from moeopt.ir.model import MoEModel
from moeopt.passes.base import ALL, Pass, PassContext, PassResult
from moeopt.passes.calib import CalibSet, check_distinct, load_app_calibration, load_calibration
from moeopt.passes.options import Option
from moeopt.passes.registry import register

# The calibration option of every pass that reads calibration datasets (importance, sensitivity).
CALIB_OPTION = Option("calib", "list", (), "calibration JSONL files or app:NAME, ';'-separated; one dataset each")
SAMPLE_TOKENS = 512  # layer inputs kept per layer: enough for output similarity, small in memory


@dataclass
class LayerStats:
    """Accumulated routing statistics of one layer over some tokens."""

    num_experts: int
    tokens: int = 0
    counts: torch.Tensor = field(init=False)  # (E,) times chosen
    prob_sum: torch.Tensor = field(init=False)  # (E,) sum of router probabilities
    swap_sum: torch.Tensor = field(init=False)  # (E,) sum of gate weight x ||x||
    coact: torch.Tensor = field(init=False)  # (E, E) tokens choosing both
    logit_sum: torch.Tensor = field(init=False)  # (E,)
    logit_gram: torch.Tensor = field(init=False)  # (E, E) sum of l l^T
    sample: list[torch.Tensor] = field(default_factory=list)  # layer inputs, (n, H) chunks

    def __post_init__(self) -> None:
        e, f64 = self.num_experts, torch.float64  # float64 sums: millions of tokens, no drift
        self.counts, self.prob_sum, self.swap_sum = (torch.zeros(e, dtype=f64) for _ in range(3))
        self.logit_sum = torch.zeros(e, dtype=f64)
        self.coact, self.logit_gram = torch.zeros(e, e, dtype=f64), torch.zeros(e, e, dtype=f64)

    def add(self, trace: RoutingTrace, with_inputs: bool = True) -> None:
        n, e = trace.logits.shape
        onehot = torch.zeros(n, e, dtype=torch.float64).scatter_(1, trace.index, 1.0)  # (N, E) chosen
        w = torch.zeros(n, e, dtype=torch.float64).scatter_(1, trace.index, trace.weights.double())
        xnorm = trace.hidden.double().norm(dim=-1, keepdim=True) if with_inputs else torch.ones(n, 1)  # (N, 1)
        logits = trace.logits.double()
        self.tokens += n
        self.counts += onehot.sum(0)
        self.prob_sum += torch.softmax(logits, dim=-1).sum(0)
        self.swap_sum += (w * xnorm).sum(0)
        self.coact += onehot.T @ onehot
        self.logit_sum += logits.sum(0)
        self.logit_gram += logits.T @ logits
        have = sum(int(s.shape[0]) for s in self.sample)
        if with_inputs and have < SAMPLE_TOKENS:
            self.sample.append(trace.hidden[: SAMPLE_TOKENS - have].detach().float().clone())

    def all_reduce_(self) -> None:
        """Sum these statistics over the ranks of a distributed run (`moeopt.distributed`), in place.

        Each rank's sample holds the first inputs of its contiguous shard, so the ranks' samples in rank
        order, cut to SAMPLE_TOKENS rows, are the rows one process keeps.
        """
        if distributed.world() == 1:
            return
        tokens = torch.tensor([float(self.tokens)], dtype=torch.float64)
        distributed.all_reduce_([tokens, self.counts, self.prob_sum, self.swap_sum, self.coact, self.logit_sum,
                                 self.logit_gram])
        self.tokens = int(tokens.item())
        sample, have = [], 0
        for chunk in (c for part in distributed.all_gather(self.sample) for c in part):
            if have < SAMPLE_TOKENS:
                sample.append(chunk[: SAMPLE_TOKENS - have])
                have += int(sample[-1].shape[0])
        self.sample = sample

    def merged(self, other: LayerStats) -> LayerStats:
        out = LayerStats(self.num_experts)
        out.tokens = self.tokens + other.tokens
        for name in ("counts", "prob_sum", "swap_sum", "coact", "logit_sum", "logit_gram"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        out.sample = (self.sample + other.sample)[:]
        return out

    @property
    def freq(self) -> torch.Tensor:
        """(E,) share of all top-k choices that went to each expert (sums to 1)."""
        return self.counts / self.counts.sum().clamp(min=1)

    @property
    def prob(self) -> torch.Tensor:
        """(E,) mean router probability."""
        return self.prob_sum / max(self.tokens, 1)

    def swapmoe(self, weight_norms: torch.Tensor) -> torch.Tensor:
        """(E,) SwapMoE importance: routed gate weight x input norm x expert weight norm, normalised."""
        s = self.swap_sum * weight_norms.double()
        return s / s.sum().clamp(min=1e-30)

    def router_similarity(self) -> torch.Tensor:
        """(E, E) Pearson correlation of experts' router logits across tokens."""
        n = max(self.tokens, 1)
        mean = self.logit_sum / n
        cov = self.logit_gram / n - torch.outer(mean, mean)
        std = cov.diagonal().clamp(min=1e-12).sqrt()
        return cov / torch.outer(std, std)

    def inputs(self) -> torch.Tensor:
        return torch.cat(self.sample) if self.sample else torch.zeros(0)


@dataclass
class Importance:
    """Per dataset and combined routing statistics; `layers[i]` is MoE layer i."""

    per_app: dict[str, list[LayerStats]]
    layers: list[LayerStats]

    def score(self, layer: int, kind: str, weight_norms: torch.Tensor | None = None) -> torch.Tensor:
        """(E,) importance of every original expert by `kind`: freq, prob or swapmoe."""
        st = self.layers[layer]
        if kind == "freq":
            return st.freq
        if kind == "prob":
            return st.prob
        if kind == "swapmoe":
            if weight_norms is None:
                raise ValueError("swapmoe importance needs the experts' weight norms")
            return st.swapmoe(weight_norms)
        raise BadInputError(f"unknown importance kind '{kind}' (freq, prob, swapmoe)")


def collect(model: MoEModel, sets: list[CalibSet], *, progress: bool = True) -> Importance:
    """Run the model over each calibration set with observers on every MoE layer."""
    per_app: dict[str, list[LayerStats]] = {}
    for cs in sets:
        stats = [LayerStats(layer.router.num_experts) for layer in model.layers]

        def observe(layer: MoELayer, trace: RoutingTrace, stats: list[LayerStats] = stats) -> None:
            stats[layer.index].add(trace)

        for layer in model.layers:
            layer.observers.append(observe)
        try:
            distributed.local(functools.partial(_forwards, model, cs, f"importance[{cs.name}]", progress))
        finally:
            for layer in model.layers:
                layer.observers.remove(observe)
        for st in stats:
            st.all_reduce_()
        per_app[cs.name] = stats
    combined = [
        _merge_all([per_app[name][i] for name in per_app]) for i in range(len(model.layers))
    ]
    return Importance(per_app, combined)


class _StopForward(Exception):
    """Raised by an observer to end a forward pass once the first router has run."""


def estimate_with_predictor(model: MoEModel, sets: list[CalibSet], *, progress: bool = True) -> Importance:
    """Importance from the first MoE layer alone: run each batch up to its router, predict the rest.

    LiteMoE's cheap path: the cost is the embedding and the first block(s), not the whole model.
    """
    from moeopt.ir.routing import route

    predictor = model.predictor
    if predictor is None:
        raise BadInputError("importance{estimator=predictor} needs a routing predictor: run `predictor` first")
    first = model.layers[0]
    per_app: dict[str, list[LayerStats]] = {}
    for cs in sets:
        stats = [LayerStats(layer.router.num_experts) for layer in model.layers]

        def observe(layer: MoELayer, trace: RoutingTrace, stats: list[LayerStats] = stats) -> None:
            stats[0].add(trace)
            with torch.no_grad():
                predicted = predictor(predictor.features(trace.hidden, trace.logits))
            for later, logits in zip(model.layers[1:], predicted, strict=True):
                w, idx = route(logits, later.router, later.table.keep_mask)
                stats[later.index].add(RoutingTrace(logits, idx, w, trace.hidden), with_inputs=False)
            raise _StopForward

        first.observers.append(observe)
        try:
            distributed.local(functools.partial(_forwards, model, cs, f"importance~[{cs.name}]", progress,
                                                _StopForward))
        finally:
            first.observers.remove(observe)
        for st in stats:
            st.all_reduce_()
        per_app[cs.name] = stats
    combined = [_merge_all([per_app[name][i] for name in per_app]) for i in range(len(model.layers))]
    return Importance(per_app, combined)


def _forwards(
    model: MoEModel, cs: CalibSet, desc: str, progress: bool, stop: type[Exception] | None = None
) -> None:
    """Run the model on this rank's share of the set's batches (all of them in one process)."""
    with torch.no_grad():
        for batch in tqdm(distributed.shard(cs.batches), desc=desc, disable=not progress, leave=False):
            with contextlib.suppress(*(() if stop is None else (stop,))):
                model.hf(input_ids=batch, use_cache=False)


def _merge_all(items: list[LayerStats]) -> LayerStats:
    out = items[0]
    for it in items[1:]:
        out = out.merged(it)
    return out


def calibration_sets(
    model: MoEModel, specs: tuple[str, ...], seq_len: int, max_tokens: int, data_root: Path | None = None
) -> list[CalibSet]:
    """Each spec is a JSONL path or `app:NAME[:SPLIT]` (that app's split, train by default, rendered
    with the app's template)."""
    if not specs:
        raise BadInputError("importance needs calibration data: importance{calib=FILE.jsonl} or calib=app:NAME")
    sets = []
    for spec in specs:
        if spec.startswith("app:"):
            name, _, split = spec[4:].partition(":")
            sets.append(load_app_calibration(model, name, split=split or "train", seq_len=seq_len,
                                             max_tokens=max_tokens, data_root=data_root))
        else:
            sets.append(load_calibration(model, Path(spec), seq_len=seq_len, max_tokens=max_tokens))
    check_distinct([s.name for s in sets])
    return sets


@register
class ImportancePass(Pass):
    name = "importance"
    kind = "analysis"
    summary = "routing statistics on calibration data: frequency, probability mass, SwapMoE score, co-activation"
    exact = True
    options = (
        CALIB_OPTION,
        Option("seq-len", "int", 128, "tokens per calibration sequence", min=8),
        Option("max-tokens", "int", 32768, "tokens per dataset at most", min=8),
        Option("progress", "bool", True, "show a progress bar"),
        Option("estimator", "choice", "router", "router: run the model; predictor: first router + predictor",
               choices=("router", "predictor")),
    )

    def call(self, model: MoEModel, ctx: PassContext) -> PassResult:
        sets = calibration_sets(
            model, self.opts["calib"], self.opts["seq-len"], self.opts["max-tokens"], ctx.data_root
        )
        if self.opts["estimator"] == "predictor":
            imp = estimate_with_predictor(model, sets, progress=self.opts["progress"])
        else:
            imp = collect(model, sets, progress=self.opts["progress"])
        ctx.analyses.put("importance", imp)
        for layer, st in zip(model.layers, imp.layers, strict=True):
            t, freq = layer.table, st.freq
            for s, info in enumerate(t.slots):
                t.with_slot_info(s, importance=float(sum(freq[e] for e in info.members)))
        tokens = sum(cs.tokens for cs in sets)
        return PassResult(model, False, ALL, {"datasets": len(sets), "tokens": tokens})
