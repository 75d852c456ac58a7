"""Which pipelines stream, and with what options: the pipeline text checked before any weight is read.

A streamed pipeline is `[importance{...}] [prune{...}] [match{...} merge{...}] [quantize{method=uniform,...}]
lower{experts=offload,...}` in that order: each of these is a per-layer computation (importance's routing
statistics need only the layer's own inputs, which the previous layer's outputs give; prune ranks one
layer's experts by them; match's assignment program has one independent block per layer, so it is solved
layer by layer; merge aligns and averages one hot expert with its moderates; uniform RTN quantizes each
expert alone, and each non-expert linear (`non-experts=4|8`, `lm-head=true`) alone when its weights are
loaded; the offload lowering writes each layer's cold records). Every other pass, or option, that needs the
whole model at once is refused with a one-line reason (`non-experts=auto` chooses widths by whole-model
sensitivities; `pin` gives experts other widths than `bits`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeopt.errors import BadInputError
from moeopt.passes.base import Pass
from moeopt.passes.pipeline import parse_pipeline
from moeopt.passes.registry import build
from moeopt.quant import linears

ORDER = ("importance", "prune", "match", "merge", "quantize", "lower")
WHY_NOT: dict[str, str] = {
    "plan": "plan solves one budget over every layer; not streamed yet",
    "sensitivity": "sensitivity measures the loss of the whole model per expert; not streamed yet",
}


@dataclass(frozen=True)
class StreamPlan:
    """The per-layer passes of a streamed compile, their options resolved (None: not in the pipeline)."""

    text: str
    importance: Pass | None
    prune: Pass | None
    match: Pass | None
    merge: Pass | None
    quantize: Pass | None
    lower: Pass

    def layer_text(self) -> str:
        """What determines each layer's result (the work folder is tied to it): the per-layer passes and
        the lowering options that shape the expert records."""
        parts = [p.text() for p in (self.importance, self.prune, self.match, self.merge, self.quantize)
                 if p is not None]
        lo = self.lower.opts
        parts.append(f"lower{{hot={lo['hot']},accuracy-level={lo['accuracy-level']}}}")
        return ",".join(parts)

    def hot(self) -> int | None:
        raw = str(self.lower.opts["hot"]).strip().lower()
        if raw == "all":
            return None
        if not raw.isdigit():
            raise BadInputError(f"option 'hot' of pass 'lower' expects a number or 'all', got '{raw}'")
        return int(raw)


def stream_plan(text: str, out: Path) -> StreamPlan:
    """Parse and check a pipeline for the streamed compile; `out` is the artifact folder (-o).

    Raises:
        BadInputError: a pass or option that cannot stream, passes out of order, no lower, or lower's
            out= naming another folder than -o.
    """
    passes = build(parse_pipeline(text))
    found: dict[str, Pass] = {}
    last = -1
    for p in passes:
        if p.name not in ORDER:
            why = WHY_NOT.get(p.name, "it needs the whole model in memory")
            raise BadInputError(f"--stream: pass '{p.name}' cannot stream: {why}")
        at = ORDER.index(p.name)
        if p.name in found or at < last:
            raise BadInputError(f"--stream runs {' -> '.join(ORDER)} once each, in that order; got '{text}'")
        found[p.name] = p
        last = at
    if "lower" not in found:
        raise BadInputError("--stream compiles to an artifact: end the pipeline with lower{experts=offload}")
    _check(found)
    lo = found["lower"]
    if lo.opts["out"] is not None and Path(lo.opts["out"]).resolve() != out.resolve():
        raise BadInputError(f"--stream writes the artifact to -o {out}; lower{{out={lo.opts['out']}}} names another")
    return StreamPlan(text, found.get("importance"), found.get("prune"), found.get("match"), found.get("merge"),
                      found.get("quantize"), lo)


def _refuse(pass_name: str, what: str, why: str) -> BadInputError:
    return BadInputError(f"--stream: {pass_name}{{{what}}} cannot stream: {why}")


def _check(found: dict[str, Pass]) -> None:
    imp = found.get("importance")
    if imp is not None and imp.opts["estimator"] != "router":
        raise _refuse("importance", "estimator=predictor", "the routing predictor is not streamed")
    pr = found.get("prune")
    if pr is not None:
        o: Mapping[str, Any] = pr.opts
        method = "importance" if o["method"] == "frequency" else o["method"]
        score = "freq" if o["method"] == "frequency" else o["score"]
        if method == "magnitude" or score in ("swapmoe", "loss"):
            raise _refuse("prune", f"method={o['method']},score={o['score']}",
                          "it ranks by expert norms or the whole model's loss; use score=freq or prob")
        if method == "importance" and imp is None:
            raise BadInputError("prune ranks experts by routing statistics: run importance{calib=...} before it")
        if o["alpha"] >= 0 and imp is None:
            raise BadInputError("prune{alpha,beta} needs routing statistics: run importance first")
    _check_merge(found)
    q = found.get("quantize")
    if q is not None:
        o = q.opts
        if o["method"] != "uniform":
            raise _refuse("quantize", f"method={o['method']}", "ilp/greedy choose bits under one budget over every "
                          "layer's sensitivities; use method=uniform")
        if o["algo"] != "rtn":
            raise _refuse("quantize", f"algo={o['algo']}", "GPTQ's Hessians are not streamed yet; use algo=rtn")
        if linears.parse_mode(o["non-experts"]) == "auto":
            raise _refuse("quantize", "non-experts=auto", "auto chooses each linear's width by whole-model "
                          "sensitivities; use non-experts=4 or 8")
        if o["scale-dtype"] != "float32":
            raise _refuse("quantize", f"scale-dtype={o['scale-dtype']}", "the streamed compile's expert records "
                          "hold float32 scales; use scale-dtype=float32")
        if o["pin"]:
            raise _refuse("quantize", f"pin={';'.join(o['pin'])}", "the streamed compile quantizes every routed "
                          "expert at `bits`")
    lo = found["lower"].opts
    if lo["experts"] != "offload":
        raise _refuse("lower", "experts=resident", "a resident graph holds every expert at once; use experts=offload")
    if lo["prefetch"] == "true":
        raise _refuse("lower", "prefetch=true", "the streamed compile has no routing predictor")
    if lo["attention"] == "gqa":
        raise _refuse("lower", "attention=gqa", "offload artifacts keep the exported attention")
    if str(lo["hot"]).strip() != "0" and (q is None or str(q.opts["bits"]).lower() in ("float", "fp16", "16")):
        raise _refuse("lower", f"hot={lo['hot']}", "hot float experts would need their float weights in the graph; "
                      "quantize them (quantize{method=uniform,bits=N}) or give hot=0")
    if not lo["kv-cache"]:
        raise _refuse("lower", "kv-cache=false", "the streamed parity check drives the KV-cache path")


def _check_merge(found: dict[str, Pass]) -> None:
    imp, pr, ma, me = (found.get(n) for n in ("importance", "prune", "match", "merge"))
    if ma is not None:
        if pr is None:
            raise BadInputError("match needs the hot/moderate classes of `prune` earlier in the pipeline")
        if ma.opts["similarity"] in ("router", "output") and imp is None:
            raise BadInputError(f"match{{similarity={ma.opts['similarity']}}} needs routing statistics: run "
                                "importance{calib=...} first")
    if me is not None:
        if ma is None:
            raise BadInputError("merge needs the pairs of `match` earlier in the pipeline")
        if me.opts["weight"] == "loss":
            raise _refuse("merge", "weight=loss", "the loss sensitivity is measured on the whole model; use "
                          "weight=freq, prob or uniform")
        if me.opts["weight"] in ("freq", "prob") and imp is None:
            raise BadInputError(f"merge{{weight={me.opts['weight']}}} needs routing statistics: run importance first")
