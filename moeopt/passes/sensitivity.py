"""`sensitivity` (analysis): how much the calibration loss rises when one expert is taken out of the router.

Routing frequency says how often an expert is chosen, not how much the task needs it. On a model trained
with a load-balancing loss the frequencies of one layer are close to uniform, and ranking by them is
weak (on the reference model, per app at half the experts, frequency pruning kept 91.4% of the apps'
accuracy and magnitude keep 96.1%; ranked by this analysis, plain pruning kept 97.2%). This analysis
measures the need directly: for each layer and each kept expert, mask that expert alone out of the
router (its tokens go to their next choice, as after pruning) and record the rise of the loss over the
unmasked model. It is the leave-one-out loss
sensitivity of expert-pruning work (e.g. Lu et al. 2024, "Not All Experts are Equal"), one
layer at a time with the other layers intact.

The loss is the task's where the data says what the task is: for an app (``app:NAME[:SPLIT]``, or JSONL
records with ``text``, ``label`` and a known ``app``) the mean negative log-likelihood of the gold label
word after the prompt, scored as `moeopt.eval` scores the app; for plain text the language-modelling
cross-entropy of the calibration tokens. Cost: one evaluation per kept expert plus one, per dataset.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from moeopt import distributed
from moeopt.errors import BadInputError
from moeopt.ir.model import MoEModel
from moeopt.passes.base import ALL, Pass, PassContext, PassResult
from moeopt.passes.calib import CalibSet, app_rows, check_distinct, load_tokenizer, read_records
from moeopt.passes.importance import CALIB_OPTION, calibration_sets
from moeopt.passes.options import Option
from moeopt.passes.registry import register

TEXT_TOKENS = 8192  # default plain-text tokens: every kept expert costs one pass over them


@dataclass
class Sensitivity:
    """Loss rise per layer and ORIGINAL expert (0 for experts not kept); per dataset and their mean."""

    per_app: dict[str, list[torch.Tensor]]
    layers: list[torch.Tensor]  # (E,) float64 each
    losses: dict[str, float]  # each dataset's loss with every expert in place

    def score(self, layer: int) -> torch.Tensor:
        """(E,) importance for ranking and merge weights: the loss rise, floored at a tiny positive value
        (an expert whose removal does not hurt gets ~0 weight, never a negative one)."""
        return self.layers[layer].clamp(min=1e-9)


def loss_scores(ctx: PassContext, layer: int, who: str) -> torch.Tensor:
    """The `sensitivity` analysis's (E,) score of `layer`, or a one-line error naming what to run first."""
    sens = ctx.analyses.peek("sensitivity")
    if sens is None:
        raise BadInputError(f"{who} needs loss sensitivities: run `sensitivity{{calib=...}}` first")
    score: torch.Tensor = sens.score(layer)
    return score


class _Labelled:
    """An app's labelled rows: the loss is the gold label's mean NLL after the prompt."""

    def __init__(self, name: str, app: Any, rows: list[dict[str, str]], tokenizer: Any) -> None:
        self.name, self.app, self.tok = name, app, tokenizer
        self.texts = [r["text"] for r in rows]
        self.gold = np.array([app.labels.index(r["label"]) for r in rows])

    def loss(self, model: MoEModel) -> float:
        from moeopt.eval.classify import gold_label_scores

        return float(-gold_label_scores(model.hf, self.tok, self.app, self.texts, self.gold).mean())


class _Text:
    """Plain calibration text: the loss is the next-token cross-entropy."""

    def __init__(self, cs: CalibSet) -> None:
        self.name, self.cs = cs.name, cs

    def loss(self, model: MoEModel) -> float:
        total, n = 0.0, 0
        for batch in self.cs.batches:
            logits = model.hf(input_ids=batch, use_cache=False).logits.float()
            total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"))
            n += int(batch[:, 1:].numel())
        return total / max(n, 1)


def _labelled_rows(spec: str, data_root: Path | None) -> tuple[str, Any, list[dict[str, str]]] | None:
    """(name, App, rows) when `spec` is labelled app data, else None."""
    from moeopt.data.apps import ALL_APPS, get_app

    if spec.startswith("app:"):
        app_name, _, split = spec[4:].partition(":")
        name, _, rows = app_rows(app_name, split or "train", data_root)
        return name, get_app(app_name), rows
    records = read_records(Path(spec))
    apps = {str(r.get("app")) for r in records}
    if len(apps) == 1 and all("label" in r and "text" in r for r in records):
        app = ALL_APPS.get(apps.pop())
        if app is not None and all(str(r["label"]) in app.labels for r in records):
            return Path(spec).stem, app, [{"text": str(r["text"]), "label": str(r["label"])} for r in records]
    return None


def datasets(model: MoEModel, specs: tuple[str, ...], rows: int, seq_len: int, max_tokens: int,
             data_root: Path | None) -> list[_Labelled | _Text]:
    """One loss per calibration spec: labelled app rows (the first `rows`) or plain text tokens."""
    if not specs:
        raise BadInputError("sensitivity needs calibration data: sensitivity{calib=FILE.jsonl} or calib=app:NAME")
    tok = load_tokenizer(model)
    out: list[_Labelled | _Text] = []
    for spec in specs:
        labelled = _labelled_rows(spec, data_root) if tok is not None else None
        if labelled is not None:
            name, app, recs = labelled
            out.append(_Labelled(name, app, recs[:rows], tok))
        else:
            out.extend(_Text(cs) for cs in calibration_sets(model, (spec,), seq_len, max_tokens, data_root))
    check_distinct([ds.name for ds in out])
    return out


def measure(model: MoEModel, sets: list[_Labelled | _Text], *, progress: bool = True) -> Sensitivity:
    """Leave-one-out loss rise of every kept expert (a slot's members are masked together)."""
    per_app: dict[str, list[torch.Tensor]] = {}
    losses: dict[str, float] = {}
    work = [(li, s) for li, layer in enumerate(model.layers) for s in range(layer.table.num_slots)]
    mine = len(range(distributed.rank(), len(work), distributed.world()))  # slots this rank masks
    bar = tqdm(total=mine * len(sets), desc="sensitivity", disable=not progress, leave=False)

    def rise(ds: _Labelled | _Text, base: float, cell: tuple[int, int]) -> float:
        layer = model.layers[cell[0]]
        t = layer.table
        members = list(t.slots[cell[1]].members)
        saved = t.keep_mask.clone()
        bar.update(1)
        try:
            t.keep_mask[members] = False
            if int(t.keep_mask.sum()) < layer.router.top_k:
                return float("inf")  # cannot be removed: the layer would route nowhere
            return ds.loss(model) - base
        finally:
            t.keep_mask.copy_(saved)

    with torch.no_grad():
        for ds in sets:
            base = ds.loss(model)
            losses[ds.name] = base
            # Distributed: slot i is masked on rank i % P (each evaluation is one process's, bit for bit).
            values = distributed.map_items(work, functools.partial(rise, ds, base))
            rises = [torch.zeros(layer.table.num_experts, dtype=torch.float64) for layer in model.layers]
            for (li, s), v in zip(work, values, strict=True):
                rises[li][list(model.layers[li].table.slots[s].members)] = v
            per_app[ds.name] = rises
    bar.close()
    layers = [torch.stack([per_app[n][i] for n in per_app]).mean(0) for i in range(len(model.layers))]
    return Sensitivity(per_app, layers, losses)


@register
class SensitivityPass(Pass):
    name = "sensitivity"
    kind = "analysis"
    summary = "loss rise when each expert alone is masked out of the router (task loss for app data)"
    exact = True
    options = (
        CALIB_OPTION,
        Option("rows", "int", 128, "labelled rows per app dataset (gold-label NLL)", min=1),
        Option("seq-len", "int", 128, "tokens per sequence of plain-text calibration", min=8),
        Option("max-tokens", "int", TEXT_TOKENS, "tokens per plain-text dataset at most", min=8),
        Option("progress", "bool", True, "show a progress bar"),
    )

    def call(self, model: MoEModel, ctx: PassContext) -> PassResult:
        o = self.opts
        sets = datasets(model, o["calib"], o["rows"], o["seq-len"], o["max-tokens"], ctx.data_root)
        sens = measure(model, sets, progress=o["progress"])
        ctx.analyses.put("sensitivity", sens)
        stats = {f"loss[{name}]": round(v, 5) for name, v in sens.losses.items()}
        return PassResult(model, False, ALL, stats | {"datasets": len(sets)})
