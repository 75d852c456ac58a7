"""PassManager: runs a pipeline with instrumentation (verify-each, print-ir-after, timing, statistics)
and writes a reproducer (input + pipeline) when a pass fails."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from moeopt.errors import MoeOptError, VerificationError
from moeopt.ir.model import MoEModel
from moeopt.ir.verify import verify
from moeopt.passes.base import Pass, PassContext, PassResult
from moeopt.passes.pipeline import Pipeline, parse_pipeline
from moeopt.passes.registry import build

REPRODUCER_FORMAT = "moeopt-reproducer"


class Instrumentation:
    """Hooks around every pass (LLVM's PassInstrumentation)."""

    def before(self, p: Pass, model: MoEModel, ctx: PassContext) -> None: ...

    def after(self, p: Pass, result: PassResult, ctx: PassContext) -> None: ...


class VerifyEach(Instrumentation):
    """Run the IR verifier after every pass; the error names the pass that broke an invariant."""

    def after(self, p: Pass, result: PassResult, ctx: PassContext) -> None:
        try:
            verify(result.model)
        except VerificationError as e:
            raise VerificationError(f"after pass '{p.name}': {e}") from e


class PrintIRAfter(Instrumentation):
    """Print the IR summary after the named passes ('all' for every pass)."""

    def __init__(self, names: Sequence[str], stream: IO[str] | None = None) -> None:
        self.names, self.stream = set(names), stream

    def after(self, p: Pass, result: PassResult, ctx: PassContext) -> None:
        if "all" in self.names or p.name in self.names:
            out = self.stream or sys.stdout
            print(f"; IR after {p.text()}", file=out)
            print(result.model.summary(), file=out)


class Timing(Instrumentation):
    def __init__(self) -> None:
        self.seconds: list[tuple[str, float]] = []
        self._t0 = 0.0

    def before(self, p: Pass, model: MoEModel, ctx: PassContext) -> None:
        self._t0 = time.perf_counter()

    def after(self, p: Pass, result: PassResult, ctx: PassContext) -> None:
        self.seconds.append((p.name, time.perf_counter() - self._t0))


@dataclass
class RunReport:
    """What a pipeline run did: per-pass statistics and timings, analyses computed."""

    model: MoEModel
    pipeline: str
    stats: list[tuple[str, dict[str, float]]] = field(default_factory=list)
    seconds: list[tuple[str, float]] = field(default_factory=list)

    def timing_table(self) -> str:
        total = sum(s for _, s in self.seconds) or 1e-12
        rows = [f"{'pass':<20} {'seconds':>9} {'share':>6}"]
        rows += [f"{n:<20} {s:9.3f} {100 * s / total:5.1f}%" for n, s in self.seconds]
        rows.append(f"{'total':<20} {total:9.3f}")
        return "\n".join(rows)

    def stats_table(self) -> str:
        rows = [f"{n}: " + ", ".join(f"{k}={v:g}" for k, v in st.items()) for n, st in self.stats if st]
        return "\n".join(rows) if rows else "(no statistics)"


class PassManager:
    """Runs a pipeline over an MoEModel.

    Args:
        pipeline: pipeline text or parsed Pipeline.
        verify_each: run the IR verifier after every pass.
        print_ir_after: pass names (or 'all') after which the IR summary is printed.
        timing: record per-pass wall time.
        reproducer_dir: where a failing run writes `moeopt-reproducer.json` (input path + pipeline).
    """

    def __init__(
        self,
        pipeline: str | Pipeline,
        *,
        verify_each: bool = False,
        print_ir_after: Sequence[str] = (),
        timing: bool = False,
        reproducer_dir: Path | None = None,
        ctx: PassContext | None = None,
        stream: IO[str] | None = None,
    ) -> None:
        self.pipeline = parse_pipeline(pipeline) if isinstance(pipeline, str) else pipeline
        self.passes = build(self.pipeline)
        self.ctx = ctx or PassContext()
        self.reproducer_dir = reproducer_dir
        self.instruments: list[Instrumentation] = []
        if verify_each:
            self.instruments.append(VerifyEach())
        if print_ir_after:
            self.instruments.append(PrintIRAfter(print_ir_after, stream))
        self._timing = Timing() if timing else None
        if self._timing:
            self.instruments.append(self._timing)

    def run(self, model: MoEModel, *, source: str | None = None) -> RunReport:
        """Run every pass in order; on failure write a reproducer (when asked) and re-raise."""
        text = self.pipeline.text()
        report = RunReport(model=model, pipeline=text)
        for p in self.passes:
            try:
                for ins in self.instruments:
                    ins.before(p, model, self.ctx)
                result = p.run(model, self.ctx)
                for ins in self.instruments:
                    ins.after(p, result, self.ctx)
            except MoeOptError as e:
                if self.reproducer_dir is not None:
                    path = write_reproducer(self.reproducer_dir, source or model.source, text, p.name, str(e))
                    e.args = (f"{e} (reproducer: {path})",)
                raise
            model = result.model
            self.ctx.analyses.invalidate(result.preserved)
            report.stats.append((p.name, dict(result.stats)))
        model.history.append(text)
        report.model = model
        report.seconds = list(self._timing.seconds) if self._timing else []
        return report


def write_reproducer(folder: Path, source: str, pipeline: str, failed: str, error: str) -> Path:
    """A JSON file that `moeopt convert --reproduce FILE` replays: the input, the pipeline, the failure."""
    import moeopt

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "moeopt-reproducer.json"
    data: dict[str, Any] = {
        "format": REPRODUCER_FORMAT, "moeopt": moeopt.__version__, "input": source, "pipeline": pipeline,
        "failed_pass": failed, "error": error,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
    return path


def read_reproducer(path: Path) -> dict[str, Any]:
    from moeopt.errors import BadInputError

    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadInputError(f"no such reproducer file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInputError(f"{path}: not a moeopt reproducer ({e.__class__.__name__})") from e
    if not isinstance(data, dict) or data.get("format") != REPRODUCER_FORMAT or "pipeline" not in data:
        raise BadInputError(f"{path}: not a moeopt reproducer (format field missing)")
    return data
