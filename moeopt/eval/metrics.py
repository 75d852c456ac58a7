"""Classification metrics computed by hand (scikit-learn is not available)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


def accuracy(gold: Sequence[str], pred: Sequence[str]) -> float:
    """Share of positions where ``pred`` equals ``gold``."""
    if len(gold) != len(pred) or not gold:
        raise ValueError("accuracy needs two equally long, non-empty sequences")
    return sum(g == p for g, p in zip(gold, pred, strict=True)) / len(gold)


def macro_f1(gold: Sequence[str], pred: Sequence[str], labels: Sequence[str] | None = None) -> float:
    """Unweighted mean of per-label F1 = 2TP / (2TP + FP + FN).

    Args:
        gold: True labels.
        pred: Predicted labels.
        labels: Labels to average over; default the union of ``gold`` and ``pred`` (as scikit-learn
            does). A label with no gold and no predicted occurrence has F1 0 if listed explicitly.
    """
    if len(gold) != len(pred) or not gold:
        raise ValueError("macro_f1 needs two equally long, non-empty sequences")
    names = sorted(set(gold) | set(pred)) if labels is None else list(labels)
    scores = []
    for label in names:
        tp = sum(g == label and p == label for g, p in zip(gold, pred, strict=True))
        fp = sum(g != label and p == label for g, p in zip(gold, pred, strict=True))
        fn = sum(g == label and p != label for g, p in zip(gold, pred, strict=True))
        denom = 2 * tp + fp + fn
        scores.append(2 * tp / denom if denom else 0.0)
    return sum(scores) / len(scores)


def majority_accuracy(gold: Sequence[str]) -> float:
    """Accuracy of always predicting the most frequent gold label of these same rows."""
    if not gold:
        raise ValueError("majority_accuracy needs a non-empty sequence")
    return Counter(gold).most_common(1)[0][1] / len(gold)
