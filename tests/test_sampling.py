"""The sampler draws from the distribution it names: softmax(logits / T), cut to the top-k tokens and/or to
the smallest most-likely set whose mass reaches top_p, renormalised (HF's order: temperature, top-k, top-p).

Empirical frequencies over N seeded draws are compared with the reference distribution token by token:
|freq - p| <= 5 * sqrt(p (1 - p) / N). Under the right distribution one token exceeds that with probability
about 6e-7 (normal approximation), so a case fails by chance about once in 10^5 seeds; a token the cut
removes must never be drawn at all. N = 20000 resolves differences of about 0.02 in any probability, far
below what a wrong temperature or an off-by-one nucleus changes (0.1 or more here).
"""

from __future__ import annotations

import numpy as np
import pytest

from moeopt.runtime.sampling import Sampler

N = 20000
LOGITS = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()  # type: ignore[no-any-return]


def _nucleus(p: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the most likely tokens, one at a time, until their mass reaches top_p; renormalise."""
    out = np.zeros_like(p)
    mass = 0.0
    for i in np.argsort(-p, kind="stable"):
        out[i] = p[i]
        mass += p[i]
        if mass >= top_p:
            break
    return out / out.sum()  # type: ignore[no-any-return]


def _top_k(p: np.ndarray, k: int) -> np.ndarray:
    out = np.where(p >= np.sort(p)[-k], p, 0.0)
    return out / out.sum()  # type: ignore[no-any-return]


def _assert_draws_follow(draws: np.ndarray, want: np.ndarray) -> None:
    n = draws.shape[0]
    freq = np.bincount(draws, minlength=want.shape[0]) / n
    bound = 5 * np.sqrt(want * (1 - want) / n)
    assert np.all(freq[want == 0] == 0), (freq, want)  # cut tokens are never drawn
    assert np.all(np.abs(freq - want) <= bound), (freq.round(4), want.round(4), bound.round(4))


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [
    (0.5, 0, 1.0),  # temperature alone: sharper than softmax(logits)
    (2.0, 0, 1.0),  # flatter
    (2.0, 0, 0.8),  # nucleus of the tempered distribution: 4 tokens (0.36, 0.22, 0.17, 0.13 reach 0.8 at the 4th)
    (1.0, 3, 1.0),  # top-k alone
    (1.5, 4, 0.7),  # all three
])
def test_sampling_matches_the_tempered_truncated_distribution(temperature: float, top_k: int, top_p: float) -> None:
    # Two different rows in one batch, interleaved: each row is drawn from its own distribution (the
    # second is the first reversed, so a per-row cut put back at the wrong token positions shows).
    rows = np.stack([LOGITS, LOGITS[::-1]])
    sampler = Sampler(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, seed=0)
    draws = sampler(np.tile(rows, (N, 1)), sampler.rng())  # (2N,)
    for r, logits in enumerate(rows):
        want = _softmax(logits / temperature)
        if top_k:
            want = _top_k(want, top_k)
        if top_p < 1:
            want = _nucleus(want, top_p)
        _assert_draws_follow(draws[r::2], want)


def test_reference_cuts_are_what_the_cases_claim() -> None:
    """The nucleus case keeps exactly 4 tokens, and would keep 3 if the cut were taken before the
    temperature: the cases above tell those orders (and an off-by-one cut) apart."""
    tempered = _softmax(LOGITS / 2.0)
    assert np.count_nonzero(_nucleus(tempered, 0.8)) == 4
    assert np.count_nonzero(_nucleus(_softmax(LOGITS), 0.8)) == 3
    assert np.cumsum(np.sort(tempered)[::-1])[2] < 0.8  # the 4th token is the one that reaches 0.8
