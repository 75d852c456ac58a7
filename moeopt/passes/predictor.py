"""`predictor`: train LiteMoE's routing predictor (a 2-layer MLP from the first MoE layer to every later
layer's router logits) on the calibration routing, attach it to the IR, and report its top-k recall.

Its input is the first MoE layer's hidden state by default (``input=hidden``); ``input=logits`` is
LiteMoE's original, the first router's output distribution (see `moeopt.ir.predictor` for why hidden).

The same predictor estimates importance cheaply (`importance{estimator=predictor}` runs the model only
up to the first router) and, lowered into the artifact, tells the runtime which experts to prefetch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moeopt.errors import BadInputError
from moeopt.ir.compute import RoutingTrace
from moeopt.ir.layer import MoELayer
from moeopt.ir.model import MoEModel
from moeopt.ir.predictor import INPUTS, PredictorInput, RoutingPredictor
from moeopt.passes.base import ALL, Pass, PassContext, PassResult
from moeopt.passes.calib import CalibSet
from moeopt.passes.importance import calibration_sets
from moeopt.passes.options import Option
from moeopt.passes.registry import register


def router_logits(
    model: MoEModel, sets: list[CalibSet], inputs: int = 1, chosen: list[torch.Tensor] | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per MoE layer, the (N, E) router logits of every calibration token; and the (N, D) inputs of the
    first `inputs` MoE layers. With `chosen` (a list to fill), also each token's argmax next token, (N,)."""
    out: list[list[torch.Tensor]] = [[] for _ in model.layers]
    hidden: list[list[torch.Tensor]] = [[] for _ in range(inputs)]
    picks: list[torch.Tensor] = []

    def observe(layer: MoELayer, trace: RoutingTrace) -> None:
        out[layer.index].append(trace.logits.detach().float())
        if layer.index < inputs:
            hidden[layer.index].append(trace.hidden.detach().float().reshape(-1, trace.hidden.shape[-1]))

    for layer in model.layers:
        layer.observers.append(observe)
    try:
        with torch.no_grad():
            for cs in sets:
                for batch in cs.batches:
                    result = model.hf(input_ids=batch, use_cache=False)
                    if chosen is not None:
                        picks.append(result.logits.argmax(-1).reshape(-1))
    finally:
        for layer in model.layers:
            layer.observers.remove(observe)
    if chosen is not None:
        chosen.append(torch.cat(picks))
    return [torch.cat(chunks) for chunks in out], [torch.cat(chunks) for chunks in hidden]


def next_token_table(ids: torch.Tensor, logits0: torch.Tensor, keep: torch.Tensor, k: int, vocab: int,
                     width: int | None = None) -> torch.Tensor:
    """(V, m) int64: per token id, the first MoE layer's experts most often among its top-k, best first (ties
    and unseen tokens by overall frequency); pruned experts never. m = `width` (default k), at most the
    kept experts. `ids` (N,), `logits0` (N, E), `keep` (E,)."""
    top = logits0.masked_fill(~keep, float("-inf")).topk(k, dim=-1).indices  # (N, k)
    counts = torch.zeros(vocab, logits0.shape[1])
    counts.index_put_((ids.repeat_interleave(k), top.reshape(-1)), torch.ones(top.numel()), accumulate=True)
    overall = counts.sum(0)
    score = counts + overall / (overall.max().clamp(min=1.0) * 2)  # < 1 count: only breaks ties
    m = min(width or k, int(keep.sum()))
    return score.masked_fill(~keep, float("-inf")).topk(m, dim=-1).indices


def topk_recall(pred: torch.Tensor, true: torch.Tensor, k: int, true_k: int | None = None) -> float:
    """Share of the true top-`true_k` experts (default k) that are in the predicted top-k, over tokens."""
    return index_recall(pred.topk(k, dim=-1).indices, true.topk(true_k or k, dim=-1).indices)


def _widths(k: int) -> tuple[int, int]:
    """The hint widths whose recall the pass reports: the router's k, and k + 1 (`lower{prefetch-top}`)."""
    return k, k + 1


def _at(m: int, k: int) -> str:
    """A recall stat's width: ``@2`` for the router's k, ``@3of2`` for 3 named of the true top-2."""
    return f"@{m}" if m == k else f"@{m}of{k}"


def _recalls(name: str, pred: torch.Tensor, true: torch.Tensor, k: int) -> dict[str, float]:
    """``{name.format(width): recall}`` at each of `_widths(k)`."""
    return {name.format(_at(m, k)): round(topk_recall(pred, true, m, k), 4) for m in _widths(k)}


def index_recall(named: torch.Tensor, true: torch.Tensor) -> float:
    """Share of the (N, k) `true` expert ids that appear in the same row of the (N, m) `named` ids."""
    hits = (named.unsqueeze(-1) == true.unsqueeze(-2)).any(-2).sum()
    return float(hits) / true.numel()


def _fit(module: nn.Module, forward: Callable[[], list[torch.Tensor]], targets: list[torch.Tensor], steps: int,
         lr: float) -> None:
    """Minimise the summed KL divergence of `forward()`'s logits to `targets` (full batch, Adam)."""
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = sum(F.kl_div(F.log_softmax(o, -1), t, reduction="batchmean")
                   for o, t in zip(forward(), targets, strict=True))
        loss.backward()  # type: ignore[union-attr]
        opt.step()


def next_positions(batches: list[torch.Tensor]) -> torch.Tensor:
    """(N,) int64 over the tokens of `batches` ((B, T) each, flattened in order): the index of the same
    sequence's next token, -1 for a sequence's last token."""
    out, start = [], 0
    for batch in batches:
        b, t = batch.shape
        idx = torch.arange(start, start + b * t).reshape(b, t) + 1
        idx[:, -1] = -1
        out.append(idx.reshape(-1))
        start += b * t
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


def far_pairs(pred: RoutingPredictor, layer: int, rows: torch.Tensor, following: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The (source row, target row) token pairs of layer `layer`'s far head among `rows`: the same token
    when its source layer runs earlier in the step, else the token and the next one of its sequence."""
    if pred.far_source(layer) < layer:
        return rows, rows
    nxt = following[rows]
    ok = nxt >= 0
    return rows[ok], nxt[ok]


def train_predictor(
    inputs: torch.Tensor, logits: list[torch.Tensor], hidden: int, steps: int, lr: float, seed: int,
    source: PredictorInput = "hidden", layer_inputs: list[torch.Tensor] | None = None, ahead_hidden: int = 0,
    far_hidden: int = 0, following: torch.Tensor | None = None, rows: torch.Tensor | None = None,
    early_hidden: int = 0,
) -> RoutingPredictor:
    """Fit the MLP from (N, F) `inputs` by KL divergence to each later layer's router distribution
    (`logits[1:]`), with `ahead_hidden` a look-ahead head per layer j >= 2 from `layer_inputs[j - 1]`, and
    with `far_hidden` the far heads (`RoutingPredictor.far_source`; `following` is `next_positions` of the
    tokens); on the tokens `rows` only (default all; a far pair needs both of its tokens there). Full
    batch, Adam, seeded. An early head of width `early_hidden` is made but not trained: its targets come
    from the next-token table (`train_early_head`)."""
    torch.manual_seed(seed)
    rows = torch.arange(len(inputs)) if rows is None else rows
    pred = RoutingPredictor(inputs.shape[1], [x.shape[1] for x in logits[1:]], hidden, source, ahead_hidden,
                            far_hidden, logits[0].shape[1], early_hidden)
    targets = [torch.softmax(x, dim=-1) for x in logits]
    x0 = inputs[rows]
    _fit(nn.ModuleList([pred.fc1, pred.fc2]), lambda: pred(x0), [t[rows] for t in targets[1:]], steps, lr)
    for j in pred.ahead_layers:
        assert layer_inputs is not None
        x = layer_inputs[j - 1][rows]
        _fit(pred.heads[j - 2], lambda j=j, x=x: [pred.ahead(j, x)], [targets[j][rows]], steps, lr)  # type: ignore[misc]
    if pred.far_layers:
        assert layer_inputs is not None and following is not None
        inside = torch.zeros(len(inputs), dtype=torch.bool)
        inside[rows] = True
        for i, j in enumerate(pred.far_layers):
            src, dst = far_pairs(pred, j, rows, following)
            src, dst = src[inside[dst]], dst[inside[dst]]
            x = layer_inputs[pred.far_source(j)][src]
            _fit(pred.far[i], lambda j=j, x=x: [pred.far_logits(j, x)], [targets[j][dst]], steps, lr)  # type: ignore[misc]
    return pred.eval()


def early_targets(table: torch.Tensor, chosen: torch.Tensor, k: int, experts: int) -> torch.Tensor:
    """(N, E_0): what the early head learns for each token: the next-token table's first `k` experts of the
    token the LM head picks there (argmax), weight 1/k each."""
    named = table[chosen, :k]  # (N, k)
    return torch.zeros(len(chosen), experts).scatter_(1, named, 1.0 / named.shape[1])


def train_early_head(pred: RoutingPredictor, x: torch.Tensor, targets: torch.Tensor, steps: int, lr: float,
                     seed: int) -> None:
    """Fit the early head from the last MoE layer's (N, D) inputs `x` to `early_targets` (KL, full batch)."""
    torch.manual_seed(seed)
    assert pred.early is not None
    _fit(pred.early, lambda: [pred.early_logits(x)], [targets], steps, lr)
    pred.eval()


@register
class Predictor(Pass):
    name = "predictor"
    kind = "transform"
    summary = "train LiteMoE's routing predictor (first MoE layer -> later routers) and attach it"
    exact = True  # the model's outputs do not change
    options = (
        Option("calib", "list", (), "calibration JSONL files or app:NAME, ';'-separated"),
        Option("input", "choice", "hidden", "what the MLP reads: the first MoE layer's hidden state, or its "
               "router logits (LiteMoE)", choices=INPUTS),
        Option("hidden", "int", 128, "MLP hidden width", min=1),
        Option("next-table", "bool", True, "a token -> first-layer experts table that names the next step's "
               "first-layer experts from the token just chosen"),
        Option("next-width", "int", 0, "experts the next-token table ranks per token (0: twice the router's "
               "top_k; lowering keeps its prefetch-top of them)", min=0),
        Option("lookahead", "int", 64, "hidden width of the look-ahead heads (layer j-1's input -> layer j's "
               "router, for j >= 2; input=hidden only); 0: none", min=0),
        Option("far", "int", 0, "hidden width of the far heads (each layer's experts two layers ahead, the "
               "next step's first two layers from this step's last two; input=hidden, 3+ MoE layers); 0: none "
               "(off by default: on 2 cores their reads cost more than they hid, bench/results/offload-sweep/far)",
               min=0),
        Option("early", "int", 64, "hidden width of the early head (the last MoE layer's input -> the first "
               "layer's experts of the next step, as the next-token table will name them for the argmax "
               "token: a read starts one expert load earlier; input=hidden with next-table); 0: none", min=0),
        Option("steps", "int", 400, "training steps (full batch, Adam)", min=1),
        Option("lr", "float", 3e-3, "learning rate", min=0.0),
        Option("holdout", "float", 0.2, "share of tokens held out to measure recall", min=0.0, max=0.9),
        Option("seq-len", "int", 128, "tokens per calibration sequence", min=8),
        Option("max-tokens", "int", 32768, "tokens per dataset at most", min=8),
    )

    def requires(self, model: MoEModel, ctx: PassContext) -> None:
        if len(model.layers) < 2:
            raise BadInputError("predictor needs at least two MoE layers (it predicts later layers from the first)")

    def call(self, model: MoEModel, ctx: PassContext) -> PassResult:
        sets = calibration_sets(
            model, self.opts["calib"], self.opts["seq-len"], self.opts["max-tokens"], ctx.data_root
        )
        source: PredictorInput = self.opts["input"]
        deep = source == "hidden" and len(model.layers) > 2
        ahead = self.opts["lookahead"] if deep else 0
        far = self.opts["far"] if deep else 0
        early = self.opts["early"] if source == "hidden" and self.opts["next-table"] else 0
        chosen: list[torch.Tensor] = []
        logits, hidden = router_logits(model, sets, inputs=len(model.layers) if far or early else
                                       len(model.layers) - 1 if ahead else 1, chosen=chosen if early else None)
        following = next_positions([batch for cs in sets for batch in cs.batches])
        inputs = hidden[0] if source == "hidden" else logits[0]
        n = logits[0].shape[0]
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(ctx.seed))
        n_test = int(n * self.opts["holdout"])
        test, train = perm[:n_test], perm[n_test:]
        pred = train_predictor(inputs, logits, self.opts["hidden"], self.opts["steps"], self.opts["lr"], ctx.seed,
                               source, hidden, ahead, far, following, train, early)
        if self.opts["next-table"]:
            ids = torch.cat([batch.reshape(-1) for cs in sets for batch in cs.batches])  # observation order
            first = model.layers[0]
            vocab = max(int(model.config.vocab_size), int(ids.max()) + 1)
            keep = first.table.keep_mask.bool()
            k = first.router.top_k
            pred.set_next_table(next_token_table(ids[train], logits[0][train], keep, k, vocab,
                                                 self.opts["next-width"] or 2 * k))
            if early:
                assert pred.next_table is not None
                targets = early_targets(pred.next_table, chosen[0], k, logits[0].shape[1])
                train_early_head(pred, hidden[-1][train], targets[train], self.opts["steps"], self.opts["lr"],
                                 ctx.seed)
        model.predictor = pred
        stats: dict[str, float] = {}
        eval_idx = test if n_test > 0 else train
        with torch.no_grad():
            outs = pred(inputs[eval_idx])
        for i, (o, layer) in enumerate(zip(outs, model.layers[1:], strict=True), start=1):
            stats.update(_recalls(f"recall{{}}-layer{i}", o, logits[i][eval_idx], layer.router.top_k))
        for j in pred.ahead_layers:
            with torch.no_grad():
                o = pred.ahead(j, hidden[j - 1][eval_idx])
            stats.update(_recalls(f"ahead-recall{{}}-layer{j}", o, logits[j][eval_idx], model.layers[j].router.top_k))
        for j in pred.far_layers:
            src, dst = far_pairs(pred, j, eval_idx, following)
            with torch.no_grad():
                o = pred.far_logits(j, hidden[pred.far_source(j)][src])
            stats.update(_recalls(f"far-recall{{}}-layer{j}", o, logits[j][dst], model.layers[j].router.top_k))
        if pred.early is not None:
            k0 = model.layers[0].router.top_k
            with torch.no_grad():
                o = pred.early_logits(hidden[-1][eval_idx])
            want = pred.next_table[chosen[0][eval_idx], :k0]  # type: ignore[index]
            for m in _widths(k0):  # of the experts the table will name after the LM head (greedy decoding)
                stats[f"early-recall{_at(m, k0)}-layer0"] = round(index_recall(o.topk(m, dim=-1).indices, want), 4)
        if pred.next_table is not None:
            first = model.layers[0]
            true_top = logits[0][eval_idx].topk(first.router.top_k, dim=-1).indices
            for m in _widths(first.router.top_k):
                if m <= pred.next_table.shape[1]:
                    known = pred.next_table[ids[eval_idx], :m]  # the table's answer, given the token
                    stats[f"next-recall{_at(m, first.router.top_k)}-layer0"] = round(index_recall(known, true_top), 4)
        size = sum(p.numel() for p in pred.parameters())
        total = sum(p.numel() for p in model.hf.parameters())
        stats["params"] = size
        stats["share-of-model"] = round(size / total, 6)
        ctx.analyses.put("predictor-recall", {k: v for k, v in stats.items() if "recall" in k})
        return PassResult(model, True, ALL, stats)
