"""App accuracy by label likelihood: predict the label whose ``" " + label`` tokens are most likely.

Cost trick (exact, not an approximation): the forward pass of ``prompt + label[:-1]`` already yields
the log-probabilities of every label whose own ``prompt + label[:-1]`` is a prefix of it. So all
single-token labels share one forward of the bare prompt, and a row needs one forward per distinct
multi-token label rather than one per label.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from moeopt.data.apps import App
from moeopt.eval.metrics import accuracy, macro_f1, majority_accuracy
from moeopt.eval.model_io import (
    as_tokenizer,
    check_vocab,
    encode,
    eos_id,
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


@dataclass(frozen=True)
class Job:
    """One forward pass: ``ids`` (T,), and the label tokens it scores as (label, position, token)."""

    row: int
    ids: tuple[int, ...]
    queries: tuple[tuple[int, int, int], ...]


def label_continuations(
    tokenizer: Any, prompt: str, labels: Sequence[str]
) -> tuple[list[int], list[list[int]]]:
    """Prompt ids and, per label, the ids of ``" " + label`` as they follow the prompt.

    The whole string is encoded so the label tokens match what training on ``App.render`` saw; if the
    tokenizer merges across the prompt/label boundary (the prompt ids are not a prefix), the label is
    encoded on its own instead.
    """
    tok = as_tokenizer(tokenizer)
    prompt_ids = encode(tok, prompt)
    conts = []
    for label in labels:
        full = encode(tok, f"{prompt} {label}")
        if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
            conts.append(full[len(prompt_ids) :])
        else:
            conts.append(encode(tok, f" {label}"))
    return prompt_ids, conts


def plan_jobs(row: int, prompt_ids: Sequence[int], conts: Sequence[Sequence[int]]) -> list[Job]:
    """The fewest forward passes that score every label continuation of one row."""
    need = {i: tuple(prompt_ids) + tuple(c[:-1]) for i, c in enumerate(conts)}
    chosen: list[tuple[int, ...]] = []
    owner: dict[int, int] = {}
    # Longest first, so a shorter need that is a prefix of a chosen sequence reuses it.
    for i in sorted(need, key=lambda k: -len(need[k])):
        seq = need[i]
        hit = next((j for j, c in enumerate(chosen) if c[: len(seq)] == seq), None)
        if hit is None:
            chosen.append(seq)
            hit = len(chosen) - 1
        owner[i] = hit
    jobs = []
    start = len(prompt_ids) - 1  # logits at this position predict the first label token
    for j, seq in enumerate(chosen):
        queries = tuple((i, start + k, t) for i in sorted(owner) if owner[i] == j
                        for k, t in enumerate(conts[i]))
        jobs.append(Job(row, seq, queries))
    return jobs


def _fit(prompt_ids: list[int], conts: list[list[int]], max_len: int | None) -> list[int]:
    """Drop prompt tokens from the left so the longest ``prompt + label[:-1]`` fits ``max_len``."""
    if max_len is None:
        return prompt_ids
    room = max_len - (max(len(c) for c in conts) - 1)
    if room < 1:
        raise ValueError(f"labels do not fit a context of {max_len} tokens")
    return prompt_ids[-room:]


def score_jobs(model: LanguageModel, jobs: Sequence[Job], scores: np.ndarray, pad_id: int) -> None:
    """Run one batch of jobs and add each queried token's log-probability into ``scores`` (rows, labels)."""
    flat = [(b, q) for b, job in enumerate(jobs) for q in job.queries]
    if is_numpy_lm(model):  # an artifact in ONNX Runtime: numpy only, no torch
        ids_np, mask_np = pad_arrays([j.ids for j in jobs], pad_id)  # (B, T), (B, T)
        logits_np = model.numpy_logits(ids_np, mask_np)  # (B, T, V)
        rows = logits_np[[b for b, _ in flat], [q[1] for _, q in flat]]  # (Q, V)
        picked = log_softmax_at(rows, np.array([q[2] for _, q in flat])).astype(np.float64)  # (Q,)
    else:
        picked = _picked_torch(model, jobs, flat, pad_id)
    for (b, (label, _, _)), lp in zip(flat, picked, strict=True):
        scores[jobs[b].row, label] += lp


def _picked_torch(model: Any, jobs: Sequence[Job], flat: list[tuple[int, tuple[int, int, int]]],
                  pad_id: int) -> np.ndarray:
    """The queried tokens' log-probabilities (Q,) from a torch module."""
    import torch

    ids, mask = pad_batch([j.ids for j in jobs], pad_id, model_device(model))  # (B, T), (B, T)
    logits = logits_of(model, ids, mask)  # (B, T, V)
    b_idx = torch.tensor([b for b, _ in flat], device=logits.device)  # (Q,)
    p_idx = torch.tensor([q[1] for _, q in flat], device=logits.device)  # (Q,)
    t_idx = torch.tensor([q[2] for _, q in flat], device=logits.device)  # (Q,)
    # Normalise only the queried positions: far cheaper than log_softmax over all of (B, T, V).
    logp = torch.log_softmax(logits[b_idx, p_idx], dim=-1)  # (Q, V)
    return logp.gather(-1, t_idx.unsqueeze(-1)).squeeze(-1).double().cpu().numpy()  # type: ignore[no-any-return]  # (Q,)


def label_scores(
    model: LanguageModel,
    tokenizer: Any,
    app: App,
    texts: Sequence[str],
    *,
    batch_size: int = 16,
    prefix_eos: bool = True,
    progress: bool = True,
) -> np.ndarray:
    """Summed log-likelihood of each label after each prompt, shape (N, L) in ``app.labels`` order.

    Args:
        prefix_eos: Start every prompt with the EOS token (when the tokenizer has one), matching a
            model trained on EOS-separated documents.
    """
    return _scores(model, tokenizer, app, texts, None, batch_size=batch_size, prefix_eos=prefix_eos,
                   progress=progress)


def gold_label_scores(
    model: LanguageModel,
    tokenizer: Any,
    app: App,
    texts: Sequence[str],
    gold: Sequence[int] | np.ndarray,
    *,
    batch_size: int = 16,
    prefix_eos: bool = True,
) -> np.ndarray:
    """Summed log-likelihood of each row's own label (index into ``app.labels``) after its prompt, (N,).

    Equal to ``label_scores(...)[i, gold[i]]`` up to float rounding (the same prompt cut, fewer forwards):
    a row costs one forward instead of one per distinct multi-token label, all a gold-label loss needs.
    """
    scores = _scores(model, tokenizer, app, texts, gold, batch_size=batch_size, prefix_eos=prefix_eos,
                     progress=False)
    return scores[np.arange(len(texts)), np.asarray(gold, dtype=np.int64)]


def _scores(
    model: LanguageModel, tokenizer: Any, app: App, texts: Sequence[str], only: Sequence[int] | np.ndarray | None, *,
    batch_size: int, prefix_eos: bool, progress: bool,
) -> np.ndarray:
    """(N, L) label log-likelihoods; with `only`, just row i's label `only[i]` (the rest stay 0)."""
    tok = as_tokenizer(tokenizer)
    eos = eos_id(tok)
    prefix = [eos] if prefix_eos and eos is not None else []
    max_len = max_positions(model)
    jobs: list[Job] = []
    for r, text in enumerate(texts):
        prompt_ids, conts = label_continuations(tok, app.prompt(text), app.labels)
        fitted = _fit(prefix + prompt_ids, conts, max_len)  # the same prompt cut as when every label is scored
        if only is None:
            jobs += plan_jobs(r, fitted, conts)
        else:
            label = int(only[r])
            jobs += [Job(j.row, j.ids, tuple((label, p, t) for _, p, t in j.queries))
                     for j in plan_jobs(r, fitted, [conts[label]])]
    check_vocab(model, [max(j.ids) for j in jobs] + [q[2] for j in jobs for q in j.queries])
    # Similar lengths per batch waste less on padding; right padding keeps scores batch-independent.
    jobs.sort(key=lambda j: -len(j.ids))
    scores = np.zeros((len(texts), len(app.labels)), dtype=np.float64)  # (N, L)
    pad_id = separator_ids(tok)[0]
    batches = range(0, len(jobs), batch_size)
    with eval_mode(model):
        for start in tqdm(batches, desc=app.name, unit="batch", disable=not progress, leave=False):
            score_jobs(model, jobs[start : start + batch_size], scores, pad_id)
    return scores


def app_accuracy(
    model: LanguageModel,
    tokenizer: Any,
    app: App,
    rows: Sequence[Mapping[str, str]],
    *,
    batch_size: int = 16,
    prefix_eos: bool = True,
    return_predictions: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Accuracy of ``model`` on ``rows`` (``{"text", "label"}``) of one app.

    Returns:
        ``accuracy``, ``macro_f1``, ``majority_acc`` (always predicting these rows' most frequent
        label), ``gold_nll`` (mean NLL of the gold label in nats: a smoother signal than accuracy
        for small quality changes), ``n``; plus ``predictions`` if asked.
    """
    if not rows:
        raise ValueError(f"app {app.name}: no rows to evaluate")
    gold = [r["label"] for r in rows]
    unknown = set(gold) - set(app.labels)
    if unknown:
        raise ValueError(f"app {app.name}: rows carry unknown labels {sorted(unknown)}")
    scores = label_scores(model, tokenizer, app, [r["text"] for r in rows], batch_size=batch_size,
                          prefix_eos=prefix_eos, progress=progress)  # (N, L)
    pred = [app.labels[i] for i in scores.argmax(axis=1)]
    gold_idx = np.array([app.labels.index(g) for g in gold])
    out: dict[str, Any] = {
        "accuracy": accuracy(gold, pred),
        "macro_f1": macro_f1(gold, pred),
        "majority_acc": majority_accuracy(gold),
        "gold_nll": float(-scores[np.arange(len(rows)), gold_idx].mean()),
        "n": len(rows),
    }
    if return_predictions:
        out["predictions"] = pred
    return out
