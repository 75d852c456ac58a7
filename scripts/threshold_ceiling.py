"""How much of a two-label app's accuracy a better decision threshold could buy, per checkpoint.

The harness predicts the label with the higher likelihood, i.e. it thresholds the score margin
``log p(label 1) - log p(label 0)`` at 0. A model whose accuracy is held back only by a biased label
prior would gain from moving that threshold; a model whose margins rank the rows poorly would not.
This script reports, per split, the accuracy at 0, the share of rows predicted as label 1 against
the gold share, and the accuracy at the best threshold *chosen on the very rows scored*: an oracle
ceiling for any recalibration of this checkpoint, not a figure to report as the model's accuracy.

Usage::

    PYTHONPATH=. .venv/bin/python scripts/threshold_ceiling.py --app movie-sentiment \
        --out bench/results/reference-stage4/threshold.json moeopt/assets/reference-moe ~/.cache/moeopt/stage4-a
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from eval_reference import load_model
from tokenizers import Tokenizer

from moeopt.data.apps import ALL_APPS, app_split, default_data_root
from moeopt.eval.classify import label_scores


def best_threshold_accuracy(margin: np.ndarray, gold1: np.ndarray) -> float:
    """The highest accuracy of ``margin > t`` over every threshold t (each distinct margin, and below all)."""
    order = np.argsort(margin, kind="stable")
    m, g = margin[order], gold1[order].astype(np.int64)
    # Cutting just below sorted position i predicts label 1 for rows i..n-1: correct are the label-0 rows
    # before i plus the label-1 rows from i on. Only cuts between distinct margins are realisable.
    neg_before = np.concatenate([[0], np.cumsum(1 - g)])
    pos_from = g.sum() - np.concatenate([[0], np.cumsum(g)])
    ok = np.concatenate([[True], m[1:] != m[:-1], [True]])
    return float(((neg_before + pos_from)[ok]).max() / len(g))


def ceiling(model_dir: Path, app_name: str, data_root: Path) -> dict[str, Any]:
    """Accuracy at the likelihood argmax and at the oracle threshold, on the app's valid and test rows."""
    app = ALL_APPS[app_name]
    model = load_model(model_dir)
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    out: dict[str, Any] = {}
    for split in ("valid", "test"):
        rows = app_split(data_root, app_name, split)
        scores = label_scores(model, tok, app, [r["text"] for r in rows], progress=False)
        gold1 = np.array([app.labels.index(r["label"]) == 1 for r in rows])
        margin = scores[:, 1] - scores[:, 0]
        out[split] = {
            "n": len(rows),
            "accuracy": round(float(((margin > 0) == gold1).mean()), 4),
            "predicted_share_" + app.labels[1]: round(float((margin > 0).mean()), 4),
            "gold_share_" + app.labels[1]: round(float(gold1.mean()), 4),
            "oracle_threshold_accuracy": round(best_threshold_accuracy(margin, gold1), 4),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("models", type=Path, nargs="+", help="checkpoint folders")
    p.add_argument("--app", default="movie-sentiment", choices=sorted(ALL_APPS))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data-root", type=Path, default=default_data_root())
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if len(ALL_APPS[args.app].labels) != 2:
        p.error(f"{args.app} has {len(ALL_APPS[args.app].labels)} labels; the threshold ceiling needs two")
    for m in args.models:
        if not (m / "config.json").is_file() or not (m / "tokenizer.json").is_file():
            p.error(f"{m}: not a checkpoint folder (needs config.json and tokenizer.json)")
    if not (args.data_root / "apps" / args.app / "test.jsonl").is_file():
        p.error(f"no prepared data for {args.app} under {args.data_root}: run `moeopt data prepare`")
    torch.set_num_threads(args.threads)
    res = {"app": args.app, "what": __doc__.split("\n\n", 1)[0].replace("\n", " "), "models": {}}
    for m in args.models:
        res["models"][m.name] = ceiling(m, args.app, args.data_root)
        print(m.name, json.dumps(res["models"][m.name]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
