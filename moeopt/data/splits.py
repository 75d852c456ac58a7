"""Deterministic, seeded, group-disjoint splitting.

Determinism comes from sorting before every seeded shuffle, so the output depends only on the records
and the seed, never on input order, hash randomisation or dict iteration.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from typing import Any

Record = dict[str, Any]


def rng_for(seed: int, name: str) -> random.Random:
    """A ``Random`` seeded from ``(seed, name)`` so each output has an independent stream."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def dedupe(records: Sequence[Record]) -> list[Record]:
    """Drop records whose text repeats; a text seen with two different labels is dropped entirely.

    Why: identical inputs in train and test inflate accuracy, and conflicting labels are noise.
    """
    labels: dict[str, set[Any]] = {}
    for r in records:
        labels.setdefault(r["text"], set()).add(r.get("label"))
    seen: set[str] = set()
    out = []
    for r in records:
        t = r["text"]
        if t in seen or len(labels[t]) > 1:
            continue
        seen.add(t)
        out.append(r)
    return out


def group_split(
    records: Sequence[Record], fractions: Mapping[str, float], *, seed: int, name: str
) -> dict[str, list[Record]]:
    """Split records so that every ``group`` lands in exactly one split.

    Groups are shuffled (seeded) and dealt to splits in the order of ``fractions`` until each split
    holds its share of *records*; the last split takes the rest. Records inside a split are shuffled.

    Args:
        records: Records with a ``"group"`` key.
        fractions: Split name -> share of records, e.g. ``{"test": .1, "valid": .05, "train": .85}``.
        seed: Global seed.
        name: Output name, mixed into the seed.
    """
    by_group: dict[str, list[Record]] = {}
    for r in records:
        by_group.setdefault(str(r["group"]), []).append(r)
    groups = sorted(by_group)
    rng = rng_for(seed, name)
    rng.shuffle(groups)
    names = list(fractions)
    total = len(records)
    out: dict[str, list[Record]] = {n: [] for n in names}
    k = 0
    for g in groups:
        # Advance to the next split once this one has its share (the last split never fills).
        while k < len(names) - 1 and len(out[names[k]]) >= fractions[names[k]] * total:
            k += 1
        out[names[k]].extend(by_group[g])
    for n in names:
        out[n].sort(key=lambda r: (str(r["group"]), r["text"]))
        rng.shuffle(out[n])
    return out


def cap(records: list[Record], limit: int | None) -> list[Record]:
    """The first ``limit`` records (records are already shuffled, so this is a seeded sample)."""
    return records if limit is None else records[:limit]


def strip_group(records: Sequence[Record], keys: tuple[str, ...]) -> list[Record]:
    """Keep only ``keys`` (in that order) for the written file."""
    return [{k: r[k] for k in keys} for r in records]
