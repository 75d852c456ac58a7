"""The one registry of passes, by kebab-case name."""

from __future__ import annotations

import difflib
import re

from moeopt.errors import BadInputError
from moeopt.passes.base import Pass
from moeopt.passes.pipeline import Element, Pipeline, parse_pipeline

REGISTRY: dict[str, type[Pass]] = {}


class UnknownPassError(BadInputError):
    """A pipeline names a pass that is not registered."""


class UnknownOptionError(BadInputError):
    """A pipeline gives a pass an option it does not have."""


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: add a pass to the registry (names are unique, kebab-case)."""
    if not re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", cls.name):
        raise ValueError(f"pass name {cls.name!r} is not kebab-case")
    if cls.name in REGISTRY:
        raise ValueError(f"pass {cls.name!r} registered twice")
    names = [o.name for o in cls.options]
    if len(set(names)) != len(names):
        raise ValueError(f"pass {cls.name!r} has duplicate option names")
    REGISTRY[cls.name] = cls
    return cls


def get_pass(name: str) -> type[Pass]:
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, list(REGISTRY), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UnknownPassError(f"unknown pass '{name}'{hint}; `moeopt passes` lists them")
    return REGISTRY[name]


def instantiate(element: Element) -> Pass:
    """A configured pass from a pipeline element: options typed and checked against the registry."""
    cls = get_pass(element.name)
    known = {o.name: o for o in cls.options}
    typed = {}
    for key, raw, _ in element.options:
        if key not in known:
            from moeopt.passes.base import unknown_option_error

            raise unknown_option_error(cls.name, key, list(known))
        typed[key] = known[key].parse(raw, cls.name)
    p = cls(**typed)
    p._raw = element.options
    return p


def build(pipeline: str | Pipeline) -> list[Pass]:
    """Parse (if text) and instantiate every pass of a pipeline."""
    pl = parse_pipeline(pipeline) if isinstance(pipeline, str) else pipeline
    return [instantiate(e) for e in pl.elements]
