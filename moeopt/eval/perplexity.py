"""Held-out perplexity over a concatenated token stream, in fixed windows."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from moeopt.eval.model_io import (
    as_tokenizer,
    check_vocab,
    encode_batch,
    eval_mode,
    is_numpy_lm,
    log_softmax_at,
    logits_of,
    max_positions,
    model_device,
    pad_arrays,
    pad_batch,
    separator_ids,
)

if TYPE_CHECKING:
    from moeopt.eval.model_io import LanguageModel

Window = tuple[int, int, int]  # (begin, length, n_scored)


def token_stream(tokenizer: Any, texts: Sequence[str], *, max_tokens: int | None = None) -> list[int]:
    """Concatenate the texts' ids, each followed by the document separator (EOS or newline).

    With ``max_tokens`` the stream is cut to ``max_tokens + 1`` ids, i.e. ``max_tokens`` predictions.
    """
    tok = as_tokenizer(tokenizer)
    sep = separator_ids(tok)
    stream: list[int] = []
    limit = None if max_tokens is None else max_tokens + 1
    # Encode in chunks so a cap stops the work early on a large corpus.
    for start in range(0, len(texts), 64):
        for ids in encode_batch(tok, texts[start : start + 64]):
            stream.extend(ids)
            stream.extend(sep)
        if limit is not None and len(stream) >= limit:
            break
    return stream if limit is None else stream[:limit]


def windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    """Windows over a stream of ``n_tokens`` ids so that every id after the first is scored once.

    A window at ``begin`` feeds ids ``[begin, begin + length)`` and predicts ids
    ``[begin + 1, begin + length]``; only its last ``n_scored`` predictions count, the ones that no
    earlier window scored. ``stride == context`` gives non-overlapping windows; a smaller stride gives
    each scored token more left context at more cost.
    """
    if not 1 <= stride <= context:
        raise ValueError(f"need 1 <= stride <= context, got stride={stride}, context={context}")
    out: list[Window] = []
    scored_until = 0  # highest target index scored so far
    begin = 0
    while scored_until < n_tokens - 1:
        length = min(context, n_tokens - 1 - begin)
        end = begin + length
        out.append((begin, length, end - scored_until))
        scored_until = end
        begin += stride
    return out


def window_nll(
    model: LanguageModel, stream: Sequence[int], wins: Sequence[Window], pad_id: int
) -> tuple[float, int]:
    """Summed NLL (nats) and count of the scored predictions of a batch of windows."""
    if is_numpy_lm(model):
        return _window_nll_numpy(model, stream, wins, pad_id)
    import torch

    assert isinstance(model, torch.nn.Module)
    device = model_device(model)
    inputs = [stream[b : b + n] for b, n, _ in wins]
    ids, mask = pad_batch(inputs, pad_id, device)  # (B, T), (B, T)
    targets, _ = pad_batch([stream[b + 1 : b + n + 1] for b, n, _ in wins], pad_id, device)  # (B, T)
    logp = torch.log_softmax(logits_of(model, ids, mask), dim=-1)  # (B, T, V)
    tok_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)
    pos = torch.arange(ids.shape[1], device=device).unsqueeze(0)  # (1, T)
    length = torch.tensor([n for _, n, _ in wins], device=device).unsqueeze(1)  # (B, 1)
    scored = torch.tensor([k for _, _, k in wins], device=device).unsqueeze(1)  # (B, 1)
    keep = (pos < length) & (pos >= length - scored)  # (B, T)
    nll = -(tok_logp.double() * keep).sum().item()
    return nll, int(keep.sum().item())


def _window_nll_numpy(model: Any, stream: Sequence[int], wins: Sequence[Window], pad_id: int) -> tuple[float, int]:
    """`window_nll` of a `NumpyLM` (an artifact in ONNX Runtime): numpy only, no torch."""
    ids, mask = pad_arrays([stream[b : b + n] for b, n, _ in wins], pad_id)  # (B, T), (B, T)
    targets, _ = pad_arrays([stream[b + 1 : b + n + 1] for b, n, _ in wins], pad_id)  # (B, T)
    tok_logp = log_softmax_at(model.numpy_logits(ids, mask), targets)  # (B, T)
    pos = np.arange(ids.shape[1])[None, :]  # (1, T)
    length = np.array([n for _, n, _ in wins])[:, None]  # (B, 1)
    scored = np.array([k for _, _, k in wins])[:, None]  # (B, 1)
    keep = (pos < length) & (pos >= length - scored)  # (B, T)
    nll = -float((tok_logp.astype(np.float64) * keep).sum())
    return nll, int(keep.sum())


def perplexity(
    model: LanguageModel,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    context: int = 256,
    stride: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity of ``model`` on the concatenation of ``texts``.

    Args:
        model: Callable as ``model(input_ids=, attention_mask=)`` returning (B, T, V) logits.
        tokenizer: A ``tokenizers.Tokenizer``.
        texts: Documents, joined with the EOS (or newline) separator.
        context: Window length in tokens (clamped to the model's ``max_position_embeddings``).
        stride: Window step; default ``context`` (non-overlapping windows).
        batch_size: Windows per forward pass.
        max_tokens: Score at most this many tokens (the first ones of the stream) to bound cost.
        progress: Show a progress bar.

    Returns:
        ``{"ppl", "nll", "tokens", "windows", "context", "stride"}``; ``nll`` is the mean in nats.
    """
    limit = max_positions(model)
    context = min(context, limit) if limit else context
    stride = context if stride is None else stride
    tok = as_tokenizer(tokenizer)
    stream = token_stream(tok, texts, max_tokens=max_tokens)
    if len(stream) < 2:
        raise ValueError("perplexity needs at least two tokens of text")
    check_vocab(model, stream)
    wins = windows(len(stream), context, stride)
    pad_id = separator_ids(tok)[0]
    total, count = 0.0, 0
    batches = range(0, len(wins), batch_size)
    with eval_mode(model):
        for start in tqdm(batches, desc="perplexity", unit="batch", disable=not progress, leave=False):
            nll, n = window_nll(model, stream, wins[start : start + batch_size], pad_id)
            total += nll
            count += n
    mean = total / count
    return {"ppl": math.exp(mean), "nll": mean, "tokens": count, "windows": len(wins),
            "context": context, "stride": stride}
