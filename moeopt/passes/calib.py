"""Calibration data for analyses: JSONL texts (or token ids) -> fixed-length token batches.

A record is {"text": ...} (tokenized with the model's tokenizer.json) or {"ids": [...]} (already token
ids, for models that ship no tokenizer). Several files are several datasets ("apps"), kept apart so
analyses can be computed per app.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from moeopt.errors import BadInputError
from moeopt.ir.model import MoEModel


@dataclass(frozen=True)
class CalibSet:
    """One dataset's tokens as (n, seq) batches."""

    name: str
    batches: tuple[torch.Tensor, ...]  # each (B, T) int64

    @property
    def tokens(self) -> int:
        return sum(int(b.numel()) for b in self.batches)


def check_distinct(names: list[str]) -> None:
    """Datasets are kept apart by name: two with one name would merge their statistics silently."""
    if len(set(names)) != len(names):
        raise BadInputError(f"calibration sets need distinct names, got {names}")


def load_tokenizer(model: MoEModel) -> object | None:
    """The model's tokenizers.Tokenizer, if its checkpoint folder has tokenizer.json."""
    if model.source_dir is None or not (model.source_dir / "tokenizer.json").exists():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model.source_dir / "tokenizer.json"))


def read_records(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        raise BadInputError(f"no such calibration file: {path}")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise BadInputError(f"{path}:{n}: not a JSON line") from None
        if not isinstance(row, dict) or not ("text" in row or "ids" in row):
            raise BadInputError(f"{path}:{n}: a calibration record needs a 'text' or 'ids' field")
        rows.append(row)
    if not rows:
        raise BadInputError(f"calibration file {path} is empty")
    return rows


def render(row: dict[str, object]) -> str:
    """A record's text; app records ({"text", "label"}) are rendered as the app's prompt + answer."""
    text = str(row["text"])
    if "label" in row and "app" in row:
        from moeopt.data.apps import ALL_APPS

        app = ALL_APPS.get(str(row["app"]))
        if app is not None:
            return app.render(text, str(row["label"]))
    return text


def load_calibration(
    model: MoEModel, path: Path, *, seq_len: int = 128, max_tokens: int = 32768, batch_size: int = 8
) -> CalibSet:
    """Tokenize a JSONL file and pack it into (batch_size, seq_len) batches, at most max_tokens tokens."""
    return _pack(model, read_records(path), path.stem, path, seq_len, max_tokens, batch_size)


def _pack(
    model: MoEModel, rows: list[dict[str, object]], name: str, path: Path, seq_len: int, max_tokens: int,
    batch_size: int,
) -> CalibSet:
    tok = load_tokenizer(model)
    stream: list[int] = []
    vocab = int(model.config.get_text_config().vocab_size)
    eos = getattr(model.config, "eos_token_id", None)
    if not (isinstance(eos, int) and 0 <= eos < vocab):  # configs often carry a default id the vocab lacks
        eos = None
    for row in rows:
        if "ids" in row:
            ids = [int(i) for i in row["ids"]]  # type: ignore[attr-defined]
        elif tok is None:
            raise BadInputError(
                f"{path}: text records need the model's tokenizer.json; give token ids as {{\"ids\": [...]}}"
            )
        else:
            ids = tok.encode(render(row)).ids  # type: ignore[attr-defined]
        stream.extend(ids)
        if eos is not None:
            stream.append(eos)
        if len(stream) >= max_tokens:
            break
    if stream and (min(stream) < 0 or max(stream) >= vocab):
        raise BadInputError(f"{path}: token ids outside the model's vocabulary (0..{vocab - 1})")
    stream = stream[:max_tokens]
    n = len(stream) // seq_len
    if n == 0:
        raise BadInputError(f"{path}: fewer than {seq_len} tokens of calibration data")
    data = torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)
    return CalibSet(name, tuple(data.split(batch_size)))


def app_rows(app: str, split: str = "train", data_root: Path | None = None) -> tuple[str, Path, list[dict[str, str]]]:
    """An app's split from the prepared data: (dataset name, file, rows ``{"text", "label"}``).

    The name is the app's for its train split, ``app:split`` otherwise.
    """
    from moeopt.data.apps import APP_SPLITS, EXTRA_SPLIT, app_split, default_data_root, get_app

    get_app(app)
    if split not in APP_SPLITS:
        raise BadInputError(f"unknown split '{split}' of app '{app}' ({', '.join(APP_SPLITS)})")
    root = data_root or default_data_root()
    path = root / "apps" / app / f"{split}.jsonl"
    if not path.exists():
        if split == EXTRA_SPLIT and path.with_name("train.jsonl").exists():
            raise BadInputError(f"app '{app}' has no {EXTRA_SPLIT} split under {root}: its train rows all fit its "
                                "train cap, or the data predates extra splits (run `moeopt data prepare` again)")
        raise BadInputError(f"no prepared data at {path}: run `moeopt data prepare` first (or pass --data)")
    rows = [{"text": r["text"], "label": r["label"]} for r in app_split(root, app, split)]
    return (app if split == "train" else f"{app}:{split}"), path, rows


def load_app_calibration(
    model: MoEModel, app: str, *, split: str = "train", seq_len: int = 128, max_tokens: int = 32768,
    data_root: Path | None = None, batch_size: int = 8,
) -> CalibSet:
    """An app's split from the prepared data, each example rendered as prompt + answer."""
    name, path, rows = app_rows(app, split, data_root)
    records: list[dict[str, object]] = [{"text": r["text"], "label": r["label"], "app": app} for r in rows]
    return _pack(model, records, name, path, seq_len, max_tokens, batch_size)
