"""Pass, PassResult, PassContext and the analysis manager.

Modelled on onnx-ir's pass infrastructure (requires -> call -> ensures, failures wrapped with the pass
name) and LLVM's new pass manager (lazily computed, cached analyses invalidated unless preserved).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Literal

from moeopt.errors import BadInputError, MoeOptError, PassError
from moeopt.ir.model import MoEModel
from moeopt.passes.options import Option

PassKind = Literal["analysis", "transform", "lowering", "utility"]
ALL = frozenset({"*"})  # "preserves every analysis"
LAYER_IO = "layer-io"  # the source's MoE layer inputs and outputs (moeopt.passes.refit), what `refit` fits to
# Analyses that record the source model, not the model being transformed: no transform invalidates them.
SOURCE_RECORDS = frozenset({LAYER_IO})


@dataclass
class PassResult:
    """What a pass did. preserved: analysis names still valid (ALL = every one)."""

    model: MoEModel
    modified: bool
    preserved: frozenset[str] = ALL
    stats: dict[str, float] = field(default_factory=dict)


AnalysisFn = Callable[[MoEModel, "PassContext"], Any]
ANALYSES: dict[str, AnalysisFn] = {}


def register_analysis(name: str) -> Callable[[AnalysisFn], AnalysisFn]:
    """Register a lazily computed analysis under `name` (kebab-case)."""

    def deco(fn: AnalysisFn) -> AnalysisFn:
        if name in ANALYSES:
            raise ValueError(f"analysis {name!r} registered twice")
        ANALYSES[name] = fn
        return fn

    return deco


class AnalysisManager:
    """Computes analyses on first use, caches them, drops the ones a pass does not preserve."""

    def __init__(self) -> None:
        self._cache: dict[str, Any] = {}
        self.computed: dict[str, int] = {}  # how often each analysis was computed (tests assert on it)

    def get(self, name: str, model: MoEModel, ctx: PassContext) -> Any:
        if name not in self._cache:
            if name not in ANALYSES:
                raise BadInputError(f"unknown analysis '{name}'")
            self._cache[name] = ANALYSES[name](model, ctx)
            self.computed[name] = self.computed.get(name, 0) + 1
        return self._cache[name]

    def put(self, name: str, value: Any) -> None:
        """Store an analysis computed by an analysis pass with its own options."""
        self._cache[name] = value

    def cached(self, name: str) -> bool:
        return name in self._cache

    def peek(self, name: str) -> Any:
        """The cached analysis, or None when it is not computed (never computes)."""
        return self._cache.get(name)

    def invalidate(self, preserved: frozenset[str]) -> list[str]:
        if preserved == ALL or "*" in preserved:
            return []
        dropped = [k for k in self._cache if k not in preserved and k not in SOURCE_RECORDS]
        for k in dropped:
            del self._cache[k]
        return dropped


@dataclass
class PassContext:
    """What a pass may use besides the model: analyses, a seed, a work folder, a log."""

    analyses: AnalysisManager = field(default_factory=AnalysisManager)
    seed: int = 0
    work_dir: Path | None = None
    data_root: Path | None = None  # where `app:NAME` calibration specs are read (default: prepared data)
    log: Callable[[str], None] = lambda msg: None


class Pass:
    """Base of every pass: one class, keyword-only options fixed at construction, no state between runs.

    Subclasses set `name` (kebab-case), `kind`, `summary`, `options`, and implement `call`. `requires`
    and `ensures` check pre- and postconditions; `run` wraps any failure with the pass name.
    """

    name: ClassVar[str]
    kind: ClassVar[PassKind] = "transform"
    summary: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()
    exact: ClassVar[bool] = False  # numerically exact transformation (tests check logits unchanged)

    def __init__(self, **opts: Any) -> None:
        known = {o.name: o for o in self.options}
        values: dict[str, Any] = {}
        for key, val in opts.items():
            opt = known.get(key) or known.get(key.replace("_", "-"))
            if opt is None:
                raise unknown_option_error(self.name, key, list(known))
            numeric = isinstance(val, (int, float)) and not isinstance(val, bool) and opt.type in ("int", "float")
            if (isinstance(val, str) and opt.type != "str") or numeric:  # a number from the API: its range too
                val = opt.parse(str(val), self.name)
            values[opt.name] = val
        for o in self.options:
            values.setdefault(o.name, o.default)
        self.opts: Mapping[str, Any] = MappingProxyType(values)
        self._raw: tuple[tuple[str, str, bool], ...] = ()

    def requires(self, model: MoEModel, ctx: PassContext) -> None:
        """Precondition; raise a MoeOptError saying what is missing."""

    def call(self, model: MoEModel, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def ensures(self, model: MoEModel, ctx: PassContext) -> None:
        """Postcondition beyond the IR verifier (which the pass manager runs with verify_each)."""

    def run(self, model: MoEModel, ctx: PassContext) -> PassResult:
        try:
            self.requires(model, ctx)
            result = self.call(model, ctx)
            self.ensures(result.model, ctx)
        except PassError:
            raise
        except MoeOptError as e:  # keep the kind (bad input, infeasible budget...), name the pass
            raise type(e)(f"pass '{self.name}': {e}") from e
        except Exception as e:
            raise PassError(self.name, f"{type(e).__name__}: {e}") from e
        return result

    def text(self) -> str:
        """This invocation as pipeline text (options as given)."""
        from moeopt.passes.pipeline import Element, needs_quotes

        if self._raw:
            return Element(self.name, self._raw).text()
        changed = [(k, _fmt(v), False) for k, v in self.opts.items() if v != self._default(k)]
        return Element(self.name, tuple((k, v, needs_quotes(v)) for k, v, _ in changed)).text()

    def _default(self, key: str) -> Any:
        return next(o.default for o in self.options if o.name == key)

    def __repr__(self) -> str:
        return f"<pass {self.text()}>"


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, tuple):
        return ";".join(map(str, v))
    return str(v)


def unknown_option_error(pass_name: str, key: str, known: list[str]) -> BadInputError:
    from moeopt.passes.registry import UnknownOptionError

    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    listing = ", ".join(known) if known else "none"
    return UnknownOptionError(f"pass '{pass_name}' has no option '{key}'{hint}; its options: {listing}")
