"""One call that measures a model on the prepared data: perplexity per corpus, accuracy per app."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from moeopt.data.apps import ALL_APPS, APPS, app_split, lm_split
from moeopt.eval.classify import app_accuracy
from moeopt.eval.perplexity import perplexity

if TYPE_CHECKING:
    from moeopt.eval.model_io import LanguageModel


def evaluate(
    model: LanguageModel,
    tokenizer: Any,
    *,
    data_root: str | os.PathLike[str],
    ppl: Sequence[str] = ("wiki", "news"),
    tasks: Literal["all"] | Sequence[str] = "all",
    split: str = "test",
    ppl_tokens: int | None = 32768,
    app_examples: int | None = 500,
    context: int = 256,
    ppl_batch_size: int = 8,
    app_batch_size: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``model`` on held-out perplexity and app accuracy.

    The caps keep a full run of a ~10M-parameter model on two CPU cores to a few minutes; both take
    the first records of the (already shuffled) split, so a capped run is deterministic.

    Args:
        model: HF-causal-LM-like module: ``model(input_ids=, attention_mask=).logits`` is (B, T, V).
        tokenizer: ``tokenizers.Tokenizer`` the model was trained with.
        data_root: Root written by ``moeopt.data.prepare``.
        ppl: LM corpora to measure (``lm/<corpus>/<split>.jsonl``; wiki only has ``test``).
        tasks: ``"all"`` or a list of app names.
        split: Which split to read (``test`` for reports, ``valid`` while tuning).
        ppl_tokens: Tokens scored per corpus (None: all).
        app_examples: Rows evaluated per app (None: all).
        context: Perplexity window length.
        ppl_batch_size: Windows per forward in perplexity.
        app_batch_size: Sequences per forward in app scoring.
        progress: Show progress bars.

    Returns:
        ``{"perplexity": {corpus: {...}}, "apps": {app: {...}}, "summary": {...}, "seconds": float}``.
    """
    t0 = time.monotonic()
    root = Path(data_root)
    names = list(APPS) if tasks == "all" else list(tasks)
    unknown = [n for n in names if n not in ALL_APPS]
    if unknown:
        raise ValueError(f"unknown apps {unknown}; known: {', '.join(ALL_APPS)}")
    result: dict[str, Any] = {"perplexity": {}, "apps": {}}
    for corpus in ppl:
        t = time.monotonic()
        texts = [r["text"] for r in lm_split(root, corpus, split)]
        result["perplexity"][corpus] = perplexity(
            model, tokenizer, texts, context=context, batch_size=ppl_batch_size,
            max_tokens=ppl_tokens, progress=progress)
        result["perplexity"][corpus]["seconds"] = round(time.monotonic() - t, 1)
    for name in names:
        t = time.monotonic()
        rows = app_split(root, name, split)
        rows = rows if app_examples is None else rows[:app_examples]
        result["apps"][name] = app_accuracy(model, tokenizer, ALL_APPS[name], rows,
                                            batch_size=app_batch_size, progress=progress)
        result["apps"][name]["seconds"] = round(time.monotonic() - t, 1)
    accs = [r["accuracy"] for r in result["apps"].values()]
    gains = [r["accuracy"] - r["majority_acc"] for r in result["apps"].values()]
    result["summary"] = {
        "mean_accuracy": sum(accs) / len(accs) if accs else math.nan,
        "mean_gain_over_majority": sum(gains) / len(gains) if gains else math.nan,
    }
    result["seconds"] = round(time.monotonic() - t0, 1)
    return result


def format_table(results: dict[str, Any]) -> str:
    """Plain-text table of an ``evaluate`` result (fixed-width, for terminals and logs)."""
    lines = [f"{'metric':<24} {'value':>9} {'n':>7}  {'detail'}", "-" * 64]
    for corpus, r in results.get("perplexity", {}).items():
        lines.append(f"{'ppl/' + corpus:<24} {r['ppl']:>9.2f} {r['tokens']:>7}  "
                     f"nll {r['nll']:.4f} nats, context {r['context']}")
    for name, r in results.get("apps", {}).items():
        lines.append(f"{'acc/' + name:<24} {r['accuracy']:>9.4f} {r['n']:>7}  "
                     f"macro-F1 {r['macro_f1']:.4f}, majority {r['majority_acc']:.4f}, "
                     f"gold NLL {r['gold_nll']:.3f}")
    summary = results.get("summary")
    if summary and results.get("apps"):
        lines.append("-" * 64)
        lines.append(f"{'mean accuracy':<24} {summary['mean_accuracy']:>9.4f}  "
                     f"({summary['mean_gain_over_majority']:+.4f} over majority)")
    if "seconds" in results:
        lines.append(f"evaluated in {results['seconds']:.1f} s")
    return "\n".join(lines)
