"""Choosing the next token from logits: greedy, or sampling with temperature / top-k / top-p."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeopt.errors import BadInputError


@dataclass(frozen=True)
class Sampler:
    """greedy (do_sample=False) or sampling; validated at construction."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0  # 1.0 = no nucleus cut
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise BadInputError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise BadInputError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise BadInputError(f"top_p must be in (0, 1], got {self.top_p}")

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)

    def __call__(self, logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:  # (B, V) -> (B,)
        if not self.do_sample:
            return logits.argmax(axis=-1).astype(np.int64)
        z = logits.astype(np.float64) / self.temperature
        if self.top_k:
            kth = np.sort(z, axis=-1)[:, -min(self.top_k, z.shape[-1])][:, None]
            z = np.where(z < kth, -np.inf, z)
        p = np.exp(z - z.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        if self.top_p < 1:
            order = np.argsort(-p, axis=-1)
            sorted_p = np.take_along_axis(p, order, axis=-1)
            # keep the smallest prefix whose mass reaches top_p (always at least the best token)
            drop_sorted = np.cumsum(sorted_p, axis=-1) - sorted_p >= self.top_p
            drop = np.zeros_like(drop_sorted)
            np.put_along_axis(drop, order, drop_sorted, axis=-1)
            p = np.where(drop, 0.0, p)
            p /= p.sum(axis=-1, keepdims=True)
        return np.array([rng.choice(p.shape[-1], p=row) for row in p], dtype=np.int64)
