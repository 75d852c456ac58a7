"""Typed, documented pass options and their parsing from pipeline text."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from moeopt.errors import BadInputError

OptionType = Literal["int", "float", "bool", "str", "path", "size", "choice", "list"]
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
LIST_SEP = ";"


class OptionTypeError(BadInputError):
    """An option value of the wrong type or out of range."""


def parse_size(raw: str) -> int:
    """'40MB' -> 40_000_000, '1.5GiB' -> 1_610_612_736, '1000' -> 1000 (bytes)."""
    m = _SIZE.match(raw.strip())
    if not m:
        raise ValueError(raw)
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()])


@dataclass(frozen=True)
class Option:
    """One keyword option of a pass: name, type, default and a one-line help."""

    name: str
    type: OptionType
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    min: float | None = None
    max: float | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_-]*", self.name):
            raise ValueError(f"option name {self.name!r} must be lower-case kebab/snake case")
        if self.type == "choice" and not self.choices:
            raise ValueError(f"choice option {self.name!r} needs choices")

    def describe_type(self) -> str:
        if self.type == "choice":
            return "one of " + "|".join(self.choices)
        return {"size": "a size (e.g. 40MB, 1.5GiB)", "list": f"a '{LIST_SEP}'-separated list",
                "bool": "true|false", "int": "an integer", "float": "a number"}.get(self.type, f"a {self.type}")

    def parse(self, raw: str, pass_name: str) -> Any:
        """Convert the option's text to its typed value; a bad value is a one-line OptionTypeError."""
        try:
            value = self._convert(raw)
        except (ValueError, TypeError):
            raise OptionTypeError(
                f"option '{self.name}' of pass '{pass_name}' expects {self.describe_type()}, got '{raw}'"
            ) from None
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if numeric and ((self.min is not None and value < self.min) or (self.max is not None and value > self.max)):
            lo = "-inf" if self.min is None else f"{self.min:g}"
            hi = "inf" if self.max is None else f"{self.max:g}"
            raise OptionTypeError(f"option '{self.name}' of pass '{pass_name}' must be in [{lo}, {hi}], got '{raw}'")
        return value

    def _convert(self, raw: str) -> Any:
        t = self.type
        if t == "int":
            return int(raw)
        if t == "float":
            v = float(raw)
            if v != v:
                raise ValueError(raw)
            return v
        if t == "bool":
            low = raw.lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return low in ("true", "1", "yes")
        if t == "size":
            return parse_size(raw)
        if t == "choice":
            if raw not in self.choices:
                raise ValueError(raw)
            return raw
        if t == "path":
            if not raw:
                raise ValueError(raw)
            return Path(raw)
        if t == "list":
            return tuple(p for p in raw.split(LIST_SEP) if p)
        return raw
