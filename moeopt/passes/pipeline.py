"""Pipeline text: `importance{calib=a.jsonl},prune{cold=0.25},verify` <-> a list of pass invocations.

Grammar (whitespace between tokens is ignored; the printed form has none):
    pipeline := element ("," element)*
    element  := NAME ("{" [option ("," option)*] "}")?
    option   := KEY "=" VALUE
    VALUE    := bare text without , { } = " or whitespace | a "double-quoted" string with \\" escapes
Printing gives back the canonical text: `parse(t).text() == t` for every canonical `t`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from moeopt.errors import BadInputError

_NAME = re.compile(r"[a-z][a-z0-9-]*")
_KEY = re.compile(r"[a-z][a-z0-9_-]*")
_BARE = re.compile(r'[^,{}="\s]+')


class PipelineSyntaxError(BadInputError):
    """Malformed pipeline text (unbalanced braces, missing '=', empty element...)."""


@dataclass(frozen=True)
class Element:
    """One pass invocation: its name and options as (key, raw text, was quoted), in the given order."""

    name: str
    options: tuple[tuple[str, str, bool], ...] = ()

    def text(self) -> str:
        if not self.options:
            return self.name
        parts = [f"{k}={_quote(v) if q else v}" for k, v, q in self.options]
        return self.name + "{" + ",".join(parts) + "}"

    def raw(self) -> dict[str, str]:
        return {k: v for k, v, _ in self.options}


@dataclass(frozen=True)
class Pipeline:
    elements: tuple[Element, ...]

    def text(self) -> str:
        return ",".join(e.text() for e in self.elements)

    def __str__(self) -> str:
        return self.text()


def _quote(v: str) -> str:
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'


def needs_quotes(v: str) -> bool:
    return not _BARE.fullmatch(v)


def option_text(v: str) -> str:
    """`v` as an option value in pipeline text: bare where it can be, double-quoted otherwise."""
    return _quote(v) if needs_quotes(v) else v


def parse_pipeline(text: str) -> Pipeline:
    """Parse pipeline text; errors are one line naming the column (1-based) and what was expected."""
    p = _Parser(text)
    return p.pipeline()


class _Parser:
    def __init__(self, text: str) -> None:
        self.s, self.i = text, 0
        self._check_braces()

    def _check_braces(self) -> None:
        depth, opened, in_q, esc = 0, -1, False, False
        for i, c in enumerate(self.s):
            if in_q:
                esc, in_q = (False, in_q) if esc else (c == "\\", c != '"')
                continue
            if c == '"':
                in_q = True
            elif c == "{":
                if depth:
                    raise PipelineSyntaxError(f"pipeline: nested '{{' at column {i + 1} (options cannot nest)")
                depth, opened = 1, i
            elif c == "}":
                if not depth:
                    raise PipelineSyntaxError(f"pipeline: unbalanced '}}' at column {i + 1}: no '{{' before it")
                depth = 0
        if in_q:
            raise PipelineSyntaxError("pipeline: unterminated '\"' string")
        if depth:
            raise PipelineSyntaxError(f"pipeline: unbalanced '{{' at column {opened + 1}: no closing '}}'")

    def err(self, what: str) -> PipelineSyntaxError:
        got = repr(self.s[self.i]) if self.i < len(self.s) else "end of text"
        return PipelineSyntaxError(f"pipeline: expected {what} at column {self.i + 1}, got {got}")

    def ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i].isspace():
            self.i += 1

    def peek(self) -> str:
        self.ws()
        return self.s[self.i] if self.i < len(self.s) else ""

    def match(self, rx: re.Pattern[str], what: str) -> str:
        self.ws()
        m = rx.match(self.s, self.i)
        if not m:
            raise self.err(what)
        self.i = m.end()
        return m.group(0)

    def pipeline(self) -> Pipeline:
        if not self.s.strip():
            raise PipelineSyntaxError("pipeline: empty pipeline text")
        elems = [self.element()]
        while self.peek() == ",":
            self.i += 1
            elems.append(self.element())
        if self.peek():
            raise self.err("',' between passes")
        return Pipeline(tuple(elems))

    def element(self) -> Element:
        name = self.match(_NAME, "a pass name (lower-case, kebab-case)")
        opts: list[tuple[str, str, bool]] = []
        if self.peek() == "{":
            self.i += 1
            if self.peek() != "}":
                opts.append(self.option())
                while self.peek() == ",":
                    self.i += 1
                    opts.append(self.option())
            if self.peek() != "}":
                raise self.err("',' or '}' in the options of '" + name + "'")
            self.i += 1
        keys = [k for k, _, _ in opts]
        for k in keys:
            if keys.count(k) > 1:
                raise PipelineSyntaxError(f"pipeline: option '{k}' given twice to pass '{name}'")
        return Element(name, tuple(opts))

    def option(self) -> tuple[str, str, bool]:
        key = self.match(_KEY, "an option name")
        if self.peek() != "=":
            raise self.err(f"'=' after option '{key}'")
        self.i += 1
        if self.peek() == '"':
            return key, self.quoted(), True
        return key, self.match(_BARE, f"a value for option '{key}'"), False

    def quoted(self) -> str:
        self.i += 1
        out = []
        while self.s[self.i] != '"':
            if self.s[self.i] == "\\":
                self.i += 1
            out.append(self.s[self.i])
            self.i += 1
        self.i += 1
        return "".join(out)
