"""Glue between the harness and any HF-causal-LM-like model plus a ``tokenizers.Tokenizer``.

The harness only assumes ``model(input_ids=..., attention_mask=...)`` returns logits of shape
(B, T, V), either as ``.logits``, as a tensor, or as the first element of a tuple. A model that instead
has ``numpy_logits(input_ids, attention_mask)`` (an artifact run by ONNX Runtime, `NumpyLM`) is scored
with numpy alone: `moeopt eval ARTIFACT` runs where torch is not installed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, TypeGuard

import numpy as np
from tokenizers import Tokenizer

if TYPE_CHECKING:
    import torch


class NumpyLM(Protocol):
    """A causal LM scored in numpy: ``numpy_logits`` maps (B, T) int64 ids and mask to (B, T, V) logits."""

    config: Any

    def numpy_logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray: ...


LanguageModel: TypeAlias = "torch.nn.Module | NumpyLM"

# Special tokens that mark a document boundary in common tokenizers, most specific first.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "<|end_of_text|>", "[EOS]", "<|im_end|>")


def as_tokenizer(tok: Any) -> Tokenizer:
    """Accept a ``tokenizers.Tokenizer`` or a transformers fast tokenizer (its backend is used)."""
    if isinstance(tok, Tokenizer):
        return tok
    backend = getattr(tok, "backend_tokenizer", None)
    if isinstance(backend, Tokenizer):
        return backend
    raise TypeError(f"expected tokenizers.Tokenizer, got {type(tok).__name__}")


def eos_id(tok: Tokenizer) -> int | None:
    """Id of the tokenizer's end-of-document token, or None if it has none."""
    for cand in EOS_CANDIDATES:
        idx = tok.token_to_id(cand)
        if idx is not None:
            return int(idx)
    return None


def encode(tok: Tokenizer, text: str) -> list[int]:
    """Token ids without special tokens: the harness places separators itself."""
    return list(tok.encode(text, add_special_tokens=False).ids)


def encode_batch(tok: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Batched ``encode`` (the Rust tokenizer parallelises it)."""
    return [list(e.ids) for e in tok.encode_batch(list(texts), add_special_tokens=False)]


def separator_ids(tok: Tokenizer) -> list[int]:
    """Ids placed between documents: EOS if the tokenizer has one, else a newline."""
    eos = eos_id(tok)
    return [eos] if eos is not None else encode(tok, "\n")


def is_numpy_lm(model: Any) -> TypeGuard[NumpyLM]:
    """Whether `model` is scored in numpy (`NumpyLM`) rather than called as a torch module."""
    return callable(getattr(model, "numpy_logits", None))


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameterless module)."""
    import torch

    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def max_positions(model: LanguageModel) -> int | None:
    """The model's context limit from its config, if it advertises one."""
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "block_size"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_vocab(model: LanguageModel, ids: Sequence[int]) -> None:
    """Fail clearly (not with an embedding IndexError) if the tokenizer outruns the model's vocab."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    top = max(ids, default=-1)
    if isinstance(vocab, int) and top >= vocab:
        raise ValueError(f"tokenizer produced id {top} but the model's vocab_size is {vocab}: "
                         "evaluate with the tokenizer the model was trained with")


def logits_of(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Run the model and return float32 logits (B, T, V)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    if hasattr(out, "logits"):
        logits = out.logits
    elif isinstance(out, (tuple, list)):
        logits = out[0]
    else:
        logits = out
    import torch

    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise TypeError("model output must carry logits of shape (B, T, V)")
    return logits.float()


def pad_arrays(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad id lists into int64 ``input_ids`` (B, T) and ``attention_mask`` (B, T).

    Right padding keeps every real token at the same position as when run alone, so a causal model's
    scores for real tokens do not depend on what else is in the batch.
    """
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)  # (B, T)
    mask = np.zeros((len(seqs), width), dtype=np.int64)  # (B, T)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask


def pad_batch(
    seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """`pad_arrays` as torch.long tensors on `device`."""
    import torch

    ids, mask = pad_arrays(seqs, pad_id)
    return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)


def log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``log_softmax(logits, -1)`` at one id per row: `logits` (..., V), `targets` (...) -> (...).

    float32, as torch's log_softmax computes it; only the picked entries are normalised and returned.
    """
    x = logits.astype(np.float32, copy=False)
    top = x.max(axis=-1, keepdims=True)  # (..., 1)
    lse = np.log(np.exp(x - top).sum(axis=-1, dtype=np.float32)) + top[..., 0]  # (...)
    picked = np.take_along_axis(x, targets[..., None].astype(np.int64), axis=-1)[..., 0]  # (...)
    return (picked - lse).astype(np.float32)


@contextmanager
def eval_mode(model: LanguageModel) -> Iterator[None]:
    """``model.eval()`` and no autograd for the block; restores every submodule's training flag.

    Flags are restored one by one because ``model.train(flag)`` would overwrite the flags of
    submodules that the caller had set differently (e.g. a frozen, eval-mode inner model). A `NumpyLM`
    has neither: the block runs as it is.
    """
    if is_numpy_lm(model):
        yield
        return
    import torch

    assert isinstance(model, torch.nn.Module)
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        for m, flag in flags:
            m.training = flag
