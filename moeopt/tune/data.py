"""Tuning examples from an app's data: token ids plus the positions the loss is taken on.

An app example is tokenized exactly as the evaluation scores it (`moeopt.eval.classify`): EOS, the
prompt, then the label's continuation tokens. The loss is on the label tokens only (what the app is
judged on) or on every token after the first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from moeopt.errors import BadInputError

LossOn = Literal["label", "all"]


@dataclass(frozen=True, eq=False)
class Example:
    """One training sequence: ids (T,) int32, and the loss on every token from position `first` on.

    Tensors rather than tuples of ints: tens of thousands of examples would otherwise cost more memory
    than a small model's weights, and tuning memory is one of the things measured.
    """

    ids: torch.Tensor  # (T,) int32
    first: int  # first target position: after the prompt (label loss) or 1 (every token)

    def __post_init__(self) -> None:
        if self.ids.dim() != 1 or len(self.ids) < 2 or not 1 <= self.first < len(self.ids):
            raise ValueError("an example needs >= 2 tokens and a target start in [1, T)")

    @property
    def target(self) -> list[bool]:
        """Per position: is this token predicted in the loss."""
        return [i >= self.first for i in range(len(self.ids))]


def read_rows(data: str, *, data_root: Path | None = None, task: str | None = None) -> tuple[list[dict[str, Any]], str]:
    """Rows of `data` (`app:NAME[:SPLIT]` or a JSONL file) and a short name for it.

    File rows are `{"text", "label"[, "app"]}` (the app comes from the row or from `task`), `{"text"}`
    or `{"ids": [...]}` (the last two: loss on all tokens only).
    """
    from moeopt.data.apps import get_app, read_jsonl
    from moeopt.passes.calib import app_rows

    if data.startswith("app:"):
        name, _, split = data[4:].partition(":")
        label, _, split_rows = app_rows(name, split or "train", data_root)
        rows = [{**r, "app": name} for r in split_rows]
    else:
        path = Path(data)
        if not path.is_file():
            raise BadInputError(f"no such app data file: {data} (give a JSONL file or app:NAME[:SPLIT])")
        try:
            rows = read_jsonl(path)
        except ValueError:
            raise BadInputError(f"{path}: not a JSONL file (one JSON object per line)") from None
        label = path.stem
        if task is not None:
            get_app(task)
            rows = [{**r, "app": r.get("app", task)} if isinstance(r, dict) else r for r in rows]
    if not rows:
        raise BadInputError(f"app data {data} is empty")
    for n, r in enumerate(rows, 1):
        if not isinstance(r, dict) or not ("text" in r or "ids" in r):
            raise BadInputError(f"{data}: record {n} needs a 'text' (with 'label') or 'ids' field")
    return rows, label


def build_examples(
    rows: list[dict[str, Any]], tokenizer: Any | None, *, loss: LossOn = "label", max_len: int = 256,
    vocab_size: int | None = None,
) -> list[Example]:
    """Tokenize rows into examples; labelled rows follow the evaluation's tokenization exactly."""
    from moeopt.data.apps import ALL_APPS
    from moeopt.eval.classify import label_continuations
    from moeopt.eval.model_io import as_tokenizer, encode, eos_id

    tok = None if tokenizer is None else as_tokenizer(tokenizer)
    eos = None if tok is None else eos_id(tok)
    prefix = [eos] if eos is not None else []
    out = []
    for n, row in enumerate(rows, 1):
        app = ALL_APPS.get(str(row.get("app", "")))
        if "ids" in row:
            ids, n_label = [int(i) for i in row["ids"]], 0
        elif tok is None:
            raise BadInputError("text records need the model's tokenizer.json; give token ids as {\"ids\": [...]}")
        elif "label" in row and app is not None:
            if row["label"] not in app.labels:
                raise BadInputError(f"record {n}: label {row['label']!r} is not one of app {app.name}'s labels")
            # The gold label alone: its continuation does not depend on the other labels.
            prompt_ids, (cont,) = label_continuations(tok, app.prompt(str(row["text"])), [str(row["label"])])
            room = max(1, max_len - len(cont) - len(prefix))
            ids, n_label = prefix + prompt_ids[-room:] + cont, len(cont)  # keep the end of a long prompt
        elif "label" in row:
            raise BadInputError(f"record {n} has a label but no app: add \"app\" to the records or pass --task NAME")
        else:
            ids, n_label = prefix + encode(tok, str(row["text"])), 0
        ids = ids[-max_len:] if n_label else ids[:max_len]
        if loss == "label" and n_label == 0:
            raise BadInputError(f"record {n} has no app label to take the loss on: use --loss all")
        if len(ids) < 2:
            continue
        if vocab_size is not None and max(ids) >= vocab_size:
            raise BadInputError(f"token id {max(ids)} outside the model's vocabulary (0..{vocab_size - 1})")
        first = len(ids) - n_label if loss == "label" else 1
        out.append(Example(torch.tensor(ids, dtype=torch.int32), first))
    if not out:
        raise BadInputError("no usable examples (every record is shorter than 2 tokens)")
    return out
