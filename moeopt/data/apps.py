"""The labelled "apps": the five the reference model trained on, the held-out ones it never saw, and
readers for the prepared JSONL splits.

An app is a prompt template plus a closed set of single-word labels; training text is
``prompt + " " + label`` and evaluation scores each label's likelihood after the prompt.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPLITS = ("train", "valid", "test")
EXTRA_SPLIT = "extra"
"""Rows of an app's train partition beyond its train cap (up to as many again): never in the reference
model's training, so an adapter for a foundation app can be tuned on data the foundation has not seen.
Only apps whose source has such rows get ``extra.jsonl``."""
APP_SPLITS = (*SPLITS, EXTRA_SPLIT)
LM_CORPORA = ("news", "wiki")


@dataclass(frozen=True)
class App:
    """A classification task phrased as next-word prediction.

    Attributes:
        name: Kebab-case app name, also the directory under ``ROOT/apps``.
        labels: Label words without a leading space; distinct single words so that the likelihood
            of ``" " + label`` after the prompt ranks them.
        template: Prompt with one ``{text}`` field; the answer follows as ``" " + label``.
        max_chars: Inputs longer than this are cut (at a word boundary) so prompts fit a short context.
    """

    name: str
    labels: tuple[str, ...]
    template: str
    max_chars: int = 600

    def __post_init__(self) -> None:
        if "{text}" not in self.template:
            raise ValueError(f"app {self.name}: template lacks {{text}}")
        if len(set(self.labels)) != len(self.labels) or len(self.labels) < 2:
            raise ValueError(f"app {self.name}: labels must be >= 2 distinct words")
        for label in self.labels:
            if not label or label != label.strip() or " " in label:
                raise ValueError(f"app {self.name}: label {label!r} must be one word, no spaces")

    def truncate(self, text: str) -> str:
        """Cut ``text`` to at most ``max_chars`` characters, preferring the last word boundary."""
        text = text.strip()
        if len(text) <= self.max_chars:
            return text
        cut = text[: self.max_chars]
        space = cut.rfind(" ")
        # Only back off to a space if it keeps most of the text; otherwise cut mid-word.
        if space > self.max_chars * 3 // 4:
            cut = cut[:space]
        return cut.rstrip()

    def prompt(self, text: str) -> str:
        """The template filled with the (truncated) input text."""
        return self.template.format(text=self.truncate(text))

    def render(self, text: str, label: str) -> str:
        """Training text: the prompt followed by ``" " + label``."""
        if label not in self.labels:
            raise ValueError(f"app {self.name}: unknown label {label!r}")
        return self.prompt(text) + " " + label


APPS: dict[str, App] = {
    app.name: app
    for app in (
        App("movie-sentiment", ("negative", "positive"), "Review: {text}\nSentiment:"),
        App("tweet-sentiment", ("negative", "neutral", "positive"), "Tweet: {text}\nSentiment:"),
        App("fact-verification", ("true", "false", "neither"), "{text}\nVerdict:"),
        App(
            "intent",
            ("weather", "music", "playlist", "restaurant", "rating", "search", "movie"),
            "Request: {text}\nIntent:",
        ),
        App(
            "news-topic",
            ("abc", "aljazeera", "bbc", "chinadaily", "cnn", "dw", "huffpost", "rte", "tass"),
            "Article: {text}\nSource:",
        ),
    )
}
"""The apps in the reference model's training mixture (its train splits); ``"all"`` in the CLI and eval."""

HELD_OUT_APPS: dict[str, App] = {
    app.name: app
    for app in (
        App(
            "health-source",
            ("bbc", "cbc", "cnn", "everyday", "fox", "guardian", "goodhealth", "kaiser", "latimes", "msn",
             "nbc", "npr", "nytimes", "reuters", "usnews", "wsj"),
            "Health tweet: {text}\nAccount:",
        ),
        App("opinion-sentiment", ("negative", "positive", "neutral", "ambivalent"), "Opinion: {text}\nSentiment:"),
    )
}
"""Apps the reference model never trained on: LiteMoE's setting, where an app brings a task new to the
shared foundation and its adapter has something to learn. Named explicitly, never part of ``"all"``."""

ALL_APPS: dict[str, App] = {**APPS, **HELD_OUT_APPS}
"""Every app by name: what names resolve against."""


def get_app(name: str) -> App:
    """The app called ``name``, foundation or held out; a one-line error naming the known apps otherwise."""
    from moeopt.errors import BadInputError

    if name not in ALL_APPS:
        raise BadInputError(f"unknown app '{name}'; apps: {', '.join(ALL_APPS)}")
    return ALL_APPS[name]


def default_data_root() -> Path:
    """Prepared-data root: ``$MOEOPT_DATA`` or ``~/.cache/moeopt/data``."""
    env = os.environ.get("MOEOPT_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "moeopt" / "data"


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a JSONL file into a list of dicts (blank lines are skipped)."""
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]]) -> None:
    """Write rows as JSONL atomically: a temp file beside ``path``, then ``os.replace``.

    Keys keep their given order and non-ASCII stays as UTF-8, so the bytes are reproducible.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the data root is shared with other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_split(split: str, known: tuple[str, ...] = SPLITS) -> None:
    if split not in known:
        raise ValueError(f"split must be one of {known}, got {split!r}")


def app_split(root: str | os.PathLike[str], app: str, split: str) -> list[dict[str, Any]]:
    """Rows ``{"text", "label"}`` of one app split under ``root/apps/<app>/<split>.jsonl``."""
    if app not in ALL_APPS:  # a ValueError like _check_split's: callers name the app in their own errors
        raise ValueError(f"unknown app {app!r}; known: {', '.join(ALL_APPS)}")
    _check_split(split, APP_SPLITS)
    return read_jsonl(Path(root) / "apps" / app / f"{split}.jsonl")


def lm_split(root: str | os.PathLike[str], corpus: str, split: str) -> list[dict[str, Any]]:
    """Rows ``{"text"}`` of one language-modelling corpus split under ``root/lm/<corpus>/``."""
    if corpus not in LM_CORPORA:
        raise ValueError(f"unknown corpus {corpus!r}; known: {', '.join(LM_CORPORA)}")
    _check_split(split)
    return read_jsonl(Path(root) / "lm" / corpus / f"{split}.jsonl")
