"""The `quantize` pass on tiny models: verified IR, packed == dequantized weights, budgets, pins, save/load, eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import moeopt
from moeopt.errors import BadInputError, InfeasibleBudgetError
from moeopt.ir.table import ExpertTable, SlotInfo
from moeopt.passes import PassContext, PassManager, parse_pipeline
from moeopt.passes.quantize import REPORT, SENSITIVITY
from moeopt.quant.groupwise import Quantized, dequantize
from moeopt.quant.report import QuantReport
from moeopt.quant.sensitivity import Sensitivity, measure
from moeopt.testing import tiny_model

FIXTURES = Path(__file__).parent / "fixtures" / "data"
FAST = "calib-tokens=256,seq-len=32,max-rows=64"  # sensitivity on a few random tokens: tests stay quick


def _model() -> moeopt.MoEModel:
    return moeopt.load(tiny_model("mixtral"))


def _run(model: moeopt.MoEModel, pipeline: str, ctx: PassContext | None = None) -> QuantReport:
    ctx = ctx or PassContext()
    PassManager(pipeline, verify_each=True, ctx=ctx).run(model)
    report = ctx.analyses.peek(REPORT)
    assert isinstance(report, QuantReport)
    return report


def _packed(table: ExpertTable, slot: int, name: str) -> Quantized:
    q = table.quantized[f"{slot}_{name}"]
    return Quantized(q.rows, q.cols, q.bits, q.group_size, q.packed, q.scales, q.zero_points)


def test_uniform_4bit_float_weights_are_the_dequantized_packed_ones() -> None:
    model = _model()
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    before = model.logits(ids)
    report = _run(model, "quantize{method=uniform,bits=4,group=32}")
    for layer in model.layers:
        t = layer.table
        assert [s.bits for s in t.slots] == [4] * t.num_slots
        for s in range(t.num_slots):
            assert torch.equal(t.w_in[s], dequantize(_packed(t, s, "w_in")))
            assert torch.equal(t.w_out[s], dequantize(_packed(t, s, "w_out")))  # (32, 48): K=48 pads group 32
    assert report.histogram() == {"4": 8}
    assert report.total_bytes == sum(layer.table.expert_bytes() for layer in model.layers)
    diff = (model.logits(ids) - before).abs().max()
    assert 0 < diff < 0.1  # lossy but close


def test_save_load_round_trip_is_bit_identical(tmp_path: Path) -> None:
    model = _model()
    _run(model, f"quantize{{avg-bits=3,group=16,{FAST}}}")
    model.save(tmp_path / "q")
    again = moeopt.load(tmp_path / "q")
    moeopt.verify(again)
    a, b = model.hf.state_dict(), again.hf.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    for la, lb in zip(model.layers, again.layers, strict=True):
        assert la.table.slots == lb.table.slots and la.table.meta() == lb.table.meta()
    ids = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(1))
    assert torch.equal(model.logits(ids), again.logits(ids))


def test_budget_is_respected_and_ilp_beats_greedy_and_uniform() -> None:
    # Halfway between uniform 3-bit and uniform 4-bit: 3 is the widest uniform choice that fits, and the
    # bytes left over let a per-expert allocation move some experts to 4 bits.
    size = {b: _run(_model(), f"quantize{{method=uniform,bits={b},group=16}}").total_bytes for b in (3, 4)}
    budget = (size[3] + size[4]) // 2
    ids = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(0))
    sens = measure(_model(), [ids], [2, 3, 4, 8], group=16, symmetric=False, source="random tokens")
    reports = {}
    for method, opts in (("ilp", ""), ("greedy", ""), ("uniform", ",bits=3")):
        model, ctx = _model(), PassContext()
        ctx.analyses.put(SENSITIVITY, sens)  # measured once on the float model, reused by every method
        reports[method] = _run(model, f"quantize{{method={method},budget={budget},group=16{opts}}}", ctx)
        assert sum(layer.table.expert_bytes() for layer in model.layers) <= budget
    with pytest.raises(InfeasibleBudgetError, match="uniform 4-bit"):
        _run(_model(), f"quantize{{method=uniform,bits=4,budget={budget},group=16}}")
    assert {b for row in reports["uniform"].bits for b in row} == {3}
    # Each method's summed sensitivity of the bits it chose, by the one table (the pass reports 0 for
    # uniform, which measures nothing; ILP and greedy must report what they chose).
    err = {m: sum(sens.error(li, s, b) for li, row in enumerate(r.bits) for s, b in enumerate(row))
           for m, r in reports.items()}
    assert reports["ilp"].error == pytest.approx(err["ilp"]) and reports["greedy"].error == pytest.approx(err["greedy"])
    assert err["ilp"] <= err["greedy"] + 1e-12
    assert err["ilp"] < 0.75 * err["uniform"]  # measured 4.0e-8 vs 7.6e-8: four experts at 4 bits
    assert reports["ilp"].stats()["expert-bytes"] <= budget


def test_avg_bits_and_pins() -> None:
    model = _model()
    report = _run(model, f"quantize{{avg-bits=7.5,group=16,candidates=2;3;4,pin=0:*@8;1:2@float,{FAST}}}")
    assert [s.bits for s in model.layers[0].table.slots] == [8, 8, 8, 8]
    assert model.layers[1].table.slots[2].bits is None and "2_w_in" not in model.layers[1].table.quantized
    assert report.nominal_bits() <= 7.5 and report.pinned == 5
    assert [s.bits for s in model.layers[1].table.slots] == [4, 4, None, 4]  # 32 + 16 + 3 * 4 <= 7.5 * 8
    assert "slots per bitwidth" in report.summary() and "layer 1:" in report.summary()


def test_relative_metric_uses_the_layer_energy() -> None:
    model = _model()
    ctx = PassContext()
    report = _run(model, f"quantize{{avg-bits=3,metric=relative,group=16,{FAST}}}", ctx)
    assert report.nominal_bits() <= 3
    assert 0 < report.error < 1  # a sum of per-expert errors relative to their layer's output energy


def test_merged_and_pruned_slots_are_quantized_by_slot() -> None:
    model = _model()
    t = model.layers[0].table
    # Slot 2 holds experts 2 and 3 (merged); layer 1 drops expert 0 (pruned).
    t.set_slots(t.w_in[:3].clone(), t.w_out[:3].clone(), [SlotInfo((0,)), SlotInfo((1,)), SlotInfo((2, 3))])
    t1 = model.layers[1].table
    t1.set_slots(t1.w_in[1:].clone(), t1.w_out[1:].clone(), [SlotInfo((1,)), SlotInfo((2,)), SlotInfo((3,))])
    report = _run(model, f"quantize{{budget=30KB,group=16,{FAST}}}")
    assert [len(row) for row in report.bits] == [3, 3]
    assert sum(layer.table.expert_bytes() for layer in model.layers) <= 30_000
    assert all(f"{s}_w_out" in layer.table.quantized or b is None
               for layer, row in zip(model.layers, report.bits, strict=True) for s, b in enumerate(row))


def test_cached_sensitivity_steers_the_allocation() -> None:
    model = _model()
    errors = [[{None: 0.0, 2: 1e-6, 8: 0.0} for _ in range(4)] for _ in range(2)]
    errors[1][3] = {None: 0.0, 2: 1.0, 8: 0.5}  # one expert is very sensitive
    ctx = PassContext()
    ctx.analyses.put(SENSITIVITY, Sensitivity(16, False, 1, errors, [[0.25] * 4] * 2, "random tokens"))
    report = _run(model, "quantize{avg-bits=3,candidates=2;8,group=16}", ctx)  # room for one 8-bit expert
    assert report.bits[1][3] == 8 and sum(b == 8 for row in report.bits for b in row) == 1


def test_infeasible_budget_is_one_line() -> None:
    with pytest.raises(InfeasibleBudgetError) as err:
        _run(_model(), f"quantize{{budget=10KB,candidates=4;8,{FAST}}}")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("pass 'quantize': budget 10,000 B is below the smallest possible size")


@pytest.mark.parametrize(("pipeline", "fragment"), [
    ("quantize", "needs exactly one of budget=SIZE or avg-bits=N"),
    ("quantize{budget=1MB,avg-bits=3}", "needs exactly one of"),
    ("quantize{method=uniform,bits=5}", "bitwidth '5' is not one of"),
    ("quantize{method=uniform,group=24}", "group must be one of"),
    ("quantize{avg-bits=3,pin=0:9@4}", "layer 0 has slots 0..3"),
    ('quantize{avg-bits=3,pin="0:1=nine"}', "is not LAYER:SLOT@BITS"),
])
def test_bad_options_are_one_line_errors(pipeline: str, fragment: str) -> None:
    with pytest.raises(BadInputError, match=fragment):
        _run(_model(), pipeline)


def test_quantizing_twice_is_refused_and_text_round_trips() -> None:
    model = _model()
    _run(model, "quantize{method=uniform,bits=8}")
    with pytest.raises(BadInputError, match="already quantized"):
        _run(model, "quantize{method=uniform,bits=8}")
    text = "quantize{avg-bits=3.5,pin=0:*@8;3:5@4,group=128,symmetric=true}"
    assert parse_pipeline(text).text() == text


def _tokenizer_and_checkpoint(folder: Path) -> Path:
    """A tiny Mixtral with a BPE tokenizer trained on the data fixtures, saved as an HF checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import MixtralConfig, MixtralForCausalLM

    from moeopt.data import lm_split

    texts = [r["text"] for r in lm_split(FIXTURES, "news", "train")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                       show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=256)
    MixtralForCausalLM(cfg).save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_eval_runs_on_a_model_quantized_with_text_calibration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOEOPT_DATA", str(FIXTURES))  # app:NAME calibration reads the fixtures
    from moeopt.eval import evaluate
    from moeopt.passes.calib import load_tokenizer

    model = moeopt.load(_tokenizer_and_checkpoint(tmp_path / "src"))
    calib = FIXTURES / "lm" / "news" / "train.jsonl"
    report = _run(model, f"quantize{{avg-bits=4,group=32,calib={calib};app:intent,calib-tokens=512,seq-len=64}}")
    assert report.nominal_bits() <= 4
    res = evaluate(model.hf, load_tokenizer(model), data_root=FIXTURES, ppl=("news",), tasks=["intent"],
                   ppl_tokens=64, app_examples=4, context=32, progress=False)
    assert res["perplexity"]["news"]["tokens"] == 64 and res["apps"]["intent"]["n"] == 4


def test_convert_then_eval_on_a_quantized_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOEOPT_DATA", str(FIXTURES))
    from tests.test_cli import run_cli

    src = _tokenizer_and_checkpoint(tmp_path / "src")
    calib = FIXTURES / "lm" / "news" / "train.jsonl"
    dest = tmp_path / "q"
    code, out, err = run_cli("convert", str(src), "-o", str(dest), "--passes",
                             f"quantize{{avg-bits=4,group=32,calib={calib};app:intent,calib-tokens=512,seq-len=64}}",
                             "--verify-each", capsys=capsys)
    assert code == 0, err
    assert any(s["bits"] for layer in json.loads((dest / "moeopt.json").read_text())["layers"]
               for s in layer["table"]["slots"])
    code, out, err = run_cli("eval", str(dest), "--data", str(FIXTURES), "--ppl", "news", "--tasks", "intent",
                             "--ppl-tokens", "64", "--app-examples", "4", capsys=capsys)
    assert code == 0, err
    assert "ppl/news" in out
