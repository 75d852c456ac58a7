"""Pipeline text parses, prints back unchanged, and every kind of mistake is a distinct one-line error."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeopt.errors import BadInputError, MoeOptError
from moeopt.passes import (
    REGISTRY,
    Option,
    OptionTypeError,
    PipelineSyntaxError,
    UnknownOptionError,
    UnknownPassError,
    build,
    parse_pipeline,
)
from moeopt.passes.options import parse_size
from moeopt.passes.pipeline import needs_quotes

_BARE = st.text(alphabet=string.ascii_letters + string.digits + "._/-+:", min_size=1, max_size=12)


def _value(opt: Option) -> st.SearchStrategy[str]:
    lo = -(10**6) if opt.min is None else opt.min
    hi = 10**6 if opt.max is None else opt.max
    if opt.type == "int":
        return st.integers(int(lo), int(hi)).map(str)
    if opt.type == "float":
        return st.floats(lo, hi, allow_nan=False).map(repr)
    if opt.type == "bool":
        return st.sampled_from(["true", "false"])
    if opt.type == "size":
        return st.tuples(st.integers(1, 999), st.sampled_from(["", "KB", "MB", "GiB"])).map(lambda t: f"{t[0]}{t[1]}")
    if opt.type == "choice":
        return st.sampled_from(opt.choices)
    if opt.type == "list":
        return st.lists(_BARE.filter(lambda s: ";" not in s), min_size=1, max_size=3).map(";".join)
    return _BARE  # str, path


@st.composite
def pipelines(draw: st.DrawFn) -> str:
    names = draw(st.lists(st.sampled_from(sorted(REGISTRY)), min_size=1, max_size=5))
    parts = []
    for name in names:
        opts = REGISTRY[name].options
        chosen = draw(st.lists(st.sampled_from(opts), unique_by=lambda o: o.name, max_size=len(opts))) if opts else []
        kv = [f"{o.name}={draw(_value(o))}" for o in chosen]
        parts.append(name + ("{" + ",".join(kv) + "}" if kv else ""))
    return ",".join(parts)


@settings(max_examples=200, deadline=None)
@given(pipelines())
def test_every_registered_pass_round_trips(text: str) -> None:
    assert parse_pipeline(text).text() == text
    passes = build(text)  # options type-check
    assert ",".join(p.text() for p in passes) == text


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=string.ascii_lowercase + '{}=,"; -_0123456789', max_size=40))
def test_parser_never_crashes_on_garbage(text: str) -> None:
    try:
        build(text)
    except MoeOptError as e:
        assert "\n" not in str(e)


@settings(max_examples=100, deadline=None)
@given(
    st.text(
        alphabet=string.printable.replace("\r", "").replace("\x0b", "").replace("\x0c", ""), min_size=1, max_size=20
    )
)
def test_quoted_values_round_trip(value: str) -> None:
    from moeopt.passes.pipeline import _quote

    text = "print{file=" + (_quote(value) if needs_quotes(value) else value) + "}"
    el = parse_pipeline(text).elements[0]
    assert el.raw()["file"] == value
    assert parse_pipeline(text).text() == text


@pytest.mark.parametrize(
    ("text", "error", "fragment"),
    [
        ("canonicalize,prnt", UnknownPassError, "unknown pass 'prnt' (did you mean 'print'?)"),
        ("print{fiel=x}", UnknownOptionError, "pass 'print' has no option 'fiel' (did you mean 'file'?)"),
        (
            "print{max-layers=three}",
            OptionTypeError,
            "option 'max-layers' of pass 'print' expects an integer, got 'three'",
        ),
        ("print{max-layers=-3}", OptionTypeError, "must be in [-1, inf]"),
        ("print{file=a", PipelineSyntaxError, "unbalanced '{' at column 6"),
        ("verify}", PipelineSyntaxError, "unbalanced '}' at column 7"),
        ("print{file=a{b}}", PipelineSyntaxError, "nested '{'"),
        ("print{file}", PipelineSyntaxError, "expected '=' after option 'file'"),
        ("verify,,print", PipelineSyntaxError, "expected a pass name"),
        ("", PipelineSyntaxError, "empty pipeline"),
        ("print{file=a,file=b}", PipelineSyntaxError, "given twice"),
        ("Verify", PipelineSyntaxError, "expected a pass name (lower-case, kebab-case) at column 1"),
    ],
)
def test_distinct_one_line_errors(text: str, error: type[BadInputError], fragment: str) -> None:
    with pytest.raises(error) as info:
        build(text)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_error_kinds_are_distinct() -> None:
    kinds = {UnknownPassError, UnknownOptionError, OptionTypeError, PipelineSyntaxError}
    assert len(kinds) == 4 and all(issubclass(k, BadInputError) for k in kinds)


def test_whitespace_is_ignored_and_printed_canonically() -> None:
    assert parse_pipeline(" canonicalize , print{ file = a.txt } ").text() == "canonicalize,print{file=a.txt}"


@pytest.mark.parametrize(("raw", "n"), [("40MB", 40_000_000), ("1.5GiB", 1_610_612_736), ("512", 512), ("2KiB", 2048)])
def test_sizes(raw: str, n: int) -> None:
    assert parse_size(raw) == n


def test_pass_options_from_python_api() -> None:
    from moeopt.passes.print_ir import PrintIR

    assert PrintIR(max_layers=2).text() == "print{max-layers=2}"
    with pytest.raises(UnknownOptionError):
        PrintIR(colour="red")
