"""Analyses are cached and invalidated; instrumentation works; failures write a replayable reproducer."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import ClassVar

import pytest
import torch

import moeopt
from moeopt.ir.model import MoEModel
from moeopt.passes import ALL, REGISTRY, Pass, PassContext, PassManager, PassResult, register
from moeopt.passes.base import PassKind
from moeopt.testing import tiny_model


class _Reads(Pass):
    """Reads param-stats (cached) and changes nothing."""

    name = "test-reads"
    kind: ClassVar[PassKind] = "analysis"

    def call(self, model: MoEModel, ctx: PassContext) -> PassResult:
        ctx.analyses.get("param-stats", model, ctx)
        return PassResult(model, False, ALL)


class _Mutates(Pass):
    """Zeroes a router row and preserves nothing."""

    name = "test-mutates"

    def call(self, model: MoEModel, ctx: PassContext) -> PassResult:
        with torch.no_grad():
            model.layers[0].router_weight[0].zero_()
        return PassResult(model, True, frozenset(), {"rows-zeroed": 1})


class _Corrupts(Pass):
    """Breaks an invariant (a dangling slot) so verify-each must stop the pipeline."""

    name = "test-corrupts"

    def call(self, model: MoEModel, ctx: PassContext) -> PassResult:
        model.layers[1].table.slot_of[0] = 42
        return PassResult(model, True, frozenset())


class _Crashes(Pass):
    """Records the model it was given (source and weights), then fails."""

    name = "test-crashes"
    seen: ClassVar[list[tuple[str, dict[str, torch.Tensor]]]] = []

    def call(self, model: MoEModel, ctx: PassContext) -> PassResult:
        self.seen.append((model.source, {k: v.clone() for k, v in model.hf.state_dict().items()}))
        raise RuntimeError("boom")


@pytest.fixture(scope="module", autouse=True)
def _test_passes() -> object:
    for cls in (_Reads, _Mutates, _Corrupts, _Crashes):
        register(cls)
    yield
    for cls in (_Reads, _Mutates, _Corrupts, _Crashes):
        REGISTRY.pop(cls.name)


def test_analyses_cached_until_a_pass_does_not_preserve_them() -> None:
    pm = PassManager("test-reads,test-reads,test-mutates,test-reads")
    report = pm.run(moeopt.load(tiny_model("mixtral")))
    assert pm.ctx.analyses.computed["param-stats"] == 2  # once, dropped by test-mutates, once more
    assert report.stats[2] == ("test-mutates", {"rows-zeroed": 1})
    assert report.model.history == ["test-reads,test-reads,test-mutates,test-reads"]


def test_verify_each_names_the_pass_that_broke_the_ir() -> None:
    with pytest.raises(moeopt.VerificationError, match=r"after pass 'test-corrupts': layer 1, expert 0: dangling-slot"):
        PassManager("canonicalize,test-corrupts,verify", verify_each=True).run(moeopt.load(tiny_model("mixtral")))


def test_without_verify_each_the_verify_pass_catches_it() -> None:
    with pytest.raises(moeopt.VerificationError, match=r"pass 'verify': layer 1"):
        PassManager("test-corrupts,verify").run(moeopt.load(tiny_model("mixtral")))


def test_crash_is_wrapped_with_pass_name_and_reproducer_replays(tiny_ckpt: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """The replay loads the recorded input, runs the recorded pipeline (test-mutates' edit is there when
    test-crashes runs again) and fails in the same pass with the same message."""
    from tests.test_cli import run_cli

    pipeline = "canonicalize,test-mutates,test-crashes"
    _Crashes.seen.clear()
    pm = PassManager(pipeline, reproducer_dir=tmp_path)
    with pytest.raises(moeopt.PassError, match=r"pass 'test-crashes': RuntimeError: boom \(reproducer: ") as info:
        pm.run(moeopt.load(tiny_ckpt), source=str(tiny_ckpt))
    rep = json.loads((tmp_path / "moeopt-reproducer.json").read_text())
    assert rep["input"] == str(tiny_ckpt) and rep["pipeline"] == pipeline
    assert rep["failed_pass"] == "test-crashes"
    assert str(info.value) == f"{rep['error']} (reproducer: {tmp_path / 'moeopt-reproducer.json'})"
    capsys.readouterr()
    code, out, err = run_cli("convert", "--reproduce", str(tmp_path / "moeopt-reproducer.json"), capsys=capsys)
    assert code == 2
    assert out.startswith(f"replaying: {tiny_ckpt} with '{pipeline}' (recorded failure in 'test-crashes')")
    assert err.strip() == f"moeopt: error: {rep['error']}"  # the same failure, one line
    assert len(_Crashes.seen) == 2  # the crashing pass ran again ...
    (src0, w0), (src1, w1) = _Crashes.seen
    assert src0 == src1 == str(tiny_ckpt)  # ... on the recorded input ...
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)  # ... after the same passes
    router = "model.layers.0.mlp.router_weight"
    assert not w1[router][0].any() and moeopt.load(tiny_ckpt).hf.state_dict()[router][0].any()  # test-mutates ran


def test_print_ir_after_and_timing() -> None:
    buf = io.StringIO()
    pm = PassManager("canonicalize,verify", print_ir_after=["verify"], timing=True, stream=buf)
    report = pm.run(moeopt.load(tiny_model("olmoe")))
    assert buf.getvalue().count("; IR after") == 1 and "MoE layers: 2" in buf.getvalue()
    assert [n for n, _ in report.seconds] == ["canonicalize", "verify"]
    assert "total" in report.timing_table()


def test_canonicalize_orders_slots_and_is_exact() -> None:
    from moeopt.ir.table import SlotInfo

    model = moeopt.load(tiny_model("mixtral"))
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    ref = model.logits(ids)
    t = model.layers[0].table
    order = [3, 1, 0, 2]
    t.set_slots(t.w_in[order], t.w_out[order], [SlotInfo((e,)) for e in order])
    assert torch.equal(model.logits(ids), ref)
    report = PassManager("canonicalize", verify_each=True).run(model)
    assert [s.members for s in t.slots] == [(0,), (1,), (2,), (3,)]
    assert report.stats[0][1]["slots-moved"] == 3
    assert torch.equal(model.logits(ids), ref)
