"""scripts/threshold_ceiling.py: the oracle-threshold accuracy of a two-label score margin."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from threshold_ceiling import best_threshold_accuracy  # scripts/ is a folder of scripts, not a package


def _brute(margin: np.ndarray, gold1: np.ndarray) -> float:
    cuts = [-np.inf, *np.unique(margin)]
    return max(float(((margin > t) == gold1).mean()) for t in cuts)


def test_best_threshold_matches_brute_force_with_ties() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 40))
        margin = rng.integers(-3, 4, n).astype(float)  # many ties: a cut can't split equal margins
        gold1 = rng.random(n) < 0.6
        assert best_threshold_accuracy(margin, gold1) == _brute(margin, gold1)


def test_a_shifted_but_perfect_ranking_reaches_one() -> None:
    gold1 = np.array([False, False, True, True, True])
    margin = np.array([1.0, 2.0, 3.0, 4.0, 5.0])  # argmax at 0 calls every row label 1: accuracy 0.6
    assert float(((margin > 0) == gold1).mean()) == 0.6
    assert best_threshold_accuracy(margin, gold1) == 1.0
