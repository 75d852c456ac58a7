"""Training and validation token streams for the reference model.

Training text is a seeded mixture of news articles (``lm/news`` train) and the five apps' train
examples rendered with ``App.render``; every document ends with ``<|endoftext|>``. The documents are
shuffled together and packed into fixed-length sequences, so the stream depends only on the data, the
tokenizer, the seed and the token budget: the MoE and the dense baseline see the same tokens in the
same order.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from moeopt.data.apps import APPS, app_split, lm_split

NEWS = "news"


@dataclass(frozen=True)
class Mixture:
    """How the training token budget is split between sources.

    Attributes:
        apps_share: Fraction of training tokens drawn from the apps (the rest is news). A large share
            lets the foundation model answer the apps' prompts without adapters.
        max_app_epochs: An app's train split is repeated at most this often; what a small app cannot
            take goes to the other apps, so tiny splits (intent) are not memorised.
        app_weights: ``(app, weight)`` pairs; an app's part of the apps' share is proportional to its
            weight (1.0 when not listed). A later stage can lean on an app that lags.
    """

    apps_share: float = 0.45
    max_app_epochs: float = 4.0
    app_weights: tuple[tuple[str, float], ...] = ()

    def weight(self, app: str) -> float:
        """The relative weight of ``app`` in the apps' share."""
        return dict(self.app_weights).get(app, 1.0)


def _rng(seed: int, name: str) -> random.Random:
    """An independent, reproducible stream per (seed, name); no dependence on hash randomisation."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def source_documents(root: Path, tok: Tokenizer, split: str = "train") -> dict[str, list[list[int]]]:
    """Token ids of every document per source (``news`` and each app), each ending with EOT."""
    return {src: [d.ids for d in ds] for src, ds in labelled_documents(root, tok, split).items()}


@dataclass(frozen=True)
class Doc:
    """One training document: token ids (ending with EOT) and which of them are an app's label."""

    ids: list[int]
    label: list[bool]


def labelled_documents(root: Path, tok: Tokenizer, split: str = "train") -> dict[str, list[Doc]]:
    """Every document per source with its label-token mask (all False for news).

    The label tokens of an app document are those of ``" " + label`` after the prompt: the prompt is
    encoded on its own and must be a token prefix of the rendered text (the byte-level pre-tokenizer
    splits before the space), which is checked.
    """
    eot = tok.token_to_id("<|endoftext|>")
    out: dict[str, list[Doc]] = {
        NEWS: [Doc([*e.ids, eot], [False] * (len(e.ids) + 1))
               for e in tok.encode_batch([r["text"] for r in lm_split(root, NEWS, split)])]
    }
    for name in sorted(APPS):
        app = APPS[name]
        rows = app_split(root, name, split)
        full = tok.encode_batch([app.render(r["text"], r["label"]) for r in rows])
        prompts = tok.encode_batch([app.prompt(r["text"]) for r in rows])
        docs = []
        for f, p in zip(full, prompts, strict=True):
            n = len(p.ids)
            if f.ids[:n] != p.ids or n == len(f.ids):
                raise ValueError(f"{name}: the prompt's tokens are not a prefix of the rendered example")
            docs.append(Doc([*f.ids, eot], [False] * n + [True] * (len(f.ids) - n) + [False]))
        out[name] = docs
    return out


def source_budgets(sizes: dict[str, int], total: int, mix: Mixture) -> dict[str, int]:
    """Tokens to draw from each source: apps share ``apps_share`` in proportion to their weights
    (water-filling under the epoch cap), news takes the rest.

    Args:
        sizes: Tokens in one epoch of each source.
        total: Training tokens wanted.
        mix: The mixture settings.
    """
    apps = sorted(s for s in sizes if s != NEWS)
    left = mix.apps_share * total
    budgets: dict[str, int] = {}
    open_apps = list(apps)
    unknown = sorted(set(dict(mix.app_weights)) - set(apps))
    if unknown:
        raise ValueError(f"app weights name unknown apps: {', '.join(unknown)}")
    # Give capped apps their cap, then split what is left by weight among the rest; repeat until stable.
    while open_apps:
        total_w = sum(mix.weight(a) for a in open_apps)
        share = {a: left * mix.weight(a) / total_w for a in open_apps}
        capped = [a for a in open_apps if mix.max_app_epochs * sizes[a] <= share[a]]
        if not capped:
            budgets.update({a: int(share[a]) for a in open_apps})
            break
        for a in capped:
            budgets[a] = int(mix.max_app_epochs * sizes[a])
            left -= budgets[a]
            open_apps.remove(a)
    budgets[NEWS] = total - sum(budgets.values())
    return budgets


def draw(docs: list[Doc], budget: int, rng: random.Random) -> list[Doc]:
    """Whole shuffled epochs of ``docs``, then a shuffled prefix, until ``budget`` tokens are drawn."""
    out: list[Doc] = []
    n = 0
    while n < budget:
        order = list(range(len(docs)))
        rng.shuffle(order)
        for i in order:
            out.append(docs[i])
            n += len(docs[i].ids)
            if n >= budget:
                break
    return out


def training_sequences(
    docs: dict[str, list[Doc]], n_seq: int, seq_len: int, seed: int, mix: Mixture
) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """The packed training sequences ``[n_seq, seq_len]``, their label-token mask (same shape) and
    the tokens drawn per source."""
    sizes = {s: sum(len(d.ids) for d in ds) for s, ds in docs.items()}
    budgets = source_budgets(sizes, n_seq * seq_len, mix)
    drawn: list[Doc] = []
    for src in sorted(docs):
        drawn.extend(draw(docs[src], budgets[src], _rng(seed, f"draw:{src}")))
    _rng(seed, "mix").shuffle(drawn)
    stream = [t for d in drawn for t in d.ids]
    mask = [m for d in drawn for m in d.label]
    if len(stream) < n_seq * seq_len:
        raise ValueError(f"stream has {len(stream)} tokens, need {n_seq * seq_len}")
    seqs = torch.tensor(stream[: n_seq * seq_len], dtype=torch.long).view(n_seq, seq_len)
    labels = torch.tensor(mask[: n_seq * seq_len], dtype=torch.bool).view(n_seq, seq_len)
    return seqs, labels, budgets


def pack(docs: list[list[int]], seq_len: int, max_seq: int) -> torch.Tensor:
    """Concatenate ``docs`` in order and cut the first ``max_seq`` full sequences."""
    stream: list[int] = []
    need = seq_len * max_seq
    for d in docs:
        stream.extend(d)
        if len(stream) >= need:
            break
    n = min(max_seq, len(stream) // seq_len)
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def validation_sets(
    root: Path, tok: Tokenizer, seq_len: int, news_seq: int = 32, app_seq: int = 6
) -> dict[str, torch.Tensor]:
    """Fixed validation sequences: ``news`` (lm/news valid) and one set per app (app valid, rendered)."""
    docs = source_documents(root, tok, "valid")
    out = {NEWS: pack(docs[NEWS], seq_len, news_seq)}
    for name in sorted(APPS):
        out[name] = pack(docs[name], seq_len, app_seq)
    return out
