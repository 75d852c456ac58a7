"""How each kind of artifact graph advances one decoding step (the loop itself is in `Session.generate`).

A stepper owns what its graph needs besides the cache: the growing attention mask and positions of a
decoder-only model, or the encoder states of an encoder-decoder one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Run = Callable[[dict[str, np.ndarray], Sequence[np.ndarray]], tuple[np.ndarray, list[np.ndarray]]]


def position_ids(mask: np.ndarray) -> np.ndarray:
    """Positions from a (B, T) left-padded mask, as transformers' generate computes them."""
    pos = np.cumsum(mask, axis=-1) - 1
    return np.where(mask == 0, 1, pos).astype(np.int64)


class DecoderOnlyStepper:
    """input_ids / attention_mask (past + new) / position_ids, with a left-padded prompt."""

    def __init__(self, run: Run, ids: np.ndarray, mask: np.ndarray) -> None:
        self.run, self.ids, self.mask = run, ids, mask
        self.pos = position_ids(mask)

    def prompt(self) -> np.ndarray:
        """What the returned sequences start with."""
        return self.ids

    def prefill(self, past: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        feeds = {"input_ids": self.ids, "attention_mask": self.mask, "position_ids": self.pos}
        self.pos = self.pos[:, -1:]
        return self.run(feeds, past)

    def step(self, tok: np.ndarray, past: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        self.mask = np.concatenate([self.mask, np.ones((self.mask.shape[0], 1), np.int64)], axis=1)
        self.pos = self.pos + 1
        return self.run({"input_ids": tok[:, None], "attention_mask": self.mask, "position_ids": self.pos}, past)


class EncoderDecoderStepper:
    """The encoder runs once on the prompt; the decoder starts from decoder_start_token_id."""

    def __init__(self, run: Run, encoder: Any, meta: dict[str, Any], ids: np.ndarray, mask: np.ndarray) -> None:
        self.run, self.mask = run, mask
        self.states = encoder.run(None, {"input_ids": ids, "attention_mask": mask})[0]  # (B, S, H)
        self.start = np.full((ids.shape[0], 1), int(meta.get("decoder_start_token_id", 0)), np.int64)

    def prompt(self) -> np.ndarray:
        return self.start

    def _feeds(self, tok: np.ndarray) -> dict[str, np.ndarray]:
        return {"decoder_input_ids": tok, "encoder_hidden_states": self.states, "attention_mask": self.mask}

    def prefill(self, past: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        return self.run(self._feeds(self.start), past)

    def step(self, tok: np.ndarray, past: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        return self.run(self._feeds(tok[:, None]), past)
