"""GPTQ (moeopt.quant.gptq) and `quantize{algo=gptq}`: lower output error than RTN on correlated inputs,
the exact MatMulNBits layout, dead inputs / singular Hessians, per-expert Hessians, RTN fallback,
lowering with parity, and one-line CLI errors."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import moeopt
from moeopt.ir.table import QuantizedMatrix
from moeopt.passes import PassContext, PassManager
from moeopt.passes.quantize import REPORT, SENSITIVITY
from moeopt.quant.expert_gptq import RTNFallbackWarning, collect_hessians
from moeopt.quant.gptq import GPTQFallbackWarning, Hessian, gptq
from moeopt.quant.groupwise import Quantized, codes, dequantize, quantize, zero_points
from moeopt.quant.report import QuantReport
from moeopt.quant.sensitivity import Sensitivity
from moeopt.testing import tiny_model

CALIB = "calib-tokens=512,seq-len=32,max-rows=64"  # a few random calibration tokens: tests stay quick


def _correlated_inputs(n: int, k: int, seed: int) -> torch.Tensor:
    """(n, k) rows with strongly correlated features and uneven scales, as real activations have."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, k // 4, generator=g)
    mix = torch.randn(k // 4, k, generator=g)
    scale = torch.exp(torch.randn(k, generator=g) * 0.5)
    return (latent @ mix + 0.3 * torch.randn(n, k, generator=g)) * scale


def _hessian(x: torch.Tensor) -> torch.Tensor:
    h = Hessian(x.shape[-1])
    h.add(x)
    return h.value()


def test_hessian_accumulates_two_over_n_x_xt() -> None:
    x = torch.randn(50, 12, generator=torch.Generator().manual_seed(0))
    h = Hessian(12)
    assert torch.equal(h.value(), torch.zeros(12, 12)) and h.count == 0
    h.add(x[:20])
    h.add(x[20:].reshape(3, 10, 12))  # leading dimensions are rows
    assert h.count == 50
    torch.testing.assert_close(h.value(), 2 / 50 * x.T @ x, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rows of length 11"):
        h.add(torch.zeros(3, 11))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group", [16, 32, 64, 128, 256])
def test_identity_hessian_gives_round_to_nearest_exactly(act_order: bool, symmetric: bool, group: int) -> None:
    # Uncorrelated inputs: nothing to compensate, so GPTQ must reproduce groupwise.quantize bit for bit
    # (same scale / zero-point formula, same group boundaries, same padding).
    w = torch.randn(12, 200, generator=torch.Generator().manual_seed(group))
    for bits in (2, 3, 4, 8):
        a, b = gptq(w, torch.eye(200), bits, group, symmetric, act_order=act_order), quantize(w, bits, group, symmetric)
        assert torch.equal(a.packed, b.packed) and torch.equal(a.scales, b.scales)
        assert (a.zero_points is None) == symmetric and (symmetric or torch.equal(a.zero_points, b.zero_points))


def _expert_error(w_in: torch.Tensor, w_out: torch.Tensor, x: torch.Tensor, qi: torch.Tensor,
                  qo: torch.Tensor) -> float:
    """Mean squared output error of a SwiGLU expert (gate rows then up rows in w_in) with (qi, qo)."""
    def run(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, a).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, b)
    return float((run(qi, qo) - run(w_in, w_out)).pow(2).mean())


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [16, 32, 64])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_reduces_the_expert_output_error_against_rtn(bits: int, group: int, act_order: bool) -> None:
    g = torch.Generator().manual_seed(1)
    hid, inter = 64, 96
    w_in, w_out = torch.randn(2 * inter, hid, generator=g) * 0.2, torch.randn(hid, inter, generator=g) * 0.2
    x = _correlated_inputs(1024, hid, seed=2)
    gate, up = F.linear(x, w_in).chunk(2, dim=-1)
    h_in, h_out = _hessian(x), _hessian(F.silu(gate) * up)
    rtn = _expert_error(w_in, w_out, x, dequantize(quantize(w_in, bits, group, False)),
                        dequantize(quantize(w_out, bits, group, False)))
    q = _expert_error(w_in, w_out, x, dequantize(gptq(w_in, h_in, bits, group, False, act_order=act_order)),
                      dequantize(gptq(w_out, h_out, bits, group, False, act_order=act_order)))
    assert q < 0.8 * rtn, (q, rtn)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize(("bits", "group", "cols", "symmetric"), [
    (2, 16, 40, False), (3, 32, 40, True), (4, 64, 200, False), (8, 256, 200, True), (3, 128, 96, False),
])
def test_gptq_packs_and_dequantizes_consistently(act_order: bool, bits: int, group: int, cols: int,
                                                 symmetric: bool) -> None:
    from moeopt.lower.onnx_quant import to_ort

    w = torch.randn(10, cols, generator=torch.Generator().manual_seed(cols))
    q = gptq(w, _hessian(_correlated_inputs(256, cols, seed=3)), bits, group, symmetric, act_order=act_order)
    assert q.nbytes() == quantize(w, bits, group, symmetric).nbytes()  # the same layout and size as RTN
    c = codes(q)
    assert int(c.min()) >= 0 and int(c.max()) < 2**bits
    pad = c.shape[1] * group - cols
    if pad:  # padding holds the zero point, as groupwise.quantize writes it (exact re-blocking relies on it)
        assert torch.equal(c[:, -1, group - pad:].float(), zero_points(q)[:, -1:].expand(-1, pad))
    deq = dequantize(q)
    assert torch.equal(deq, ((c.float() - zero_points(q)[..., None]) * q.scales[..., None]).reshape(10, -1)[:, :cols])
    assert (deq - w).abs().max() < (q.scales.abs().max() * 2**bits)  # a real approximation, not garbage
    stored = QuantizedMatrix(q.rows, q.cols, q.bits, q.group, q.symmetric, q.packed, q.scales, q.zero_points)
    conv = to_ort(stored, 16 if group == 16 else 32)  # what lowering does with the packed form
    back = Quantized(conv.rows, conv.cols, conv.bits, conv.group_size, conv.packed, conv.scales, conv.zero_points)
    assert torch.equal(dequantize(back), deq)


def test_dead_inputs_are_rounded_plainly_and_nothing_is_nan() -> None:
    cols = 64
    w = torch.randn(8, cols, generator=torch.Generator().manual_seed(4))
    x = _correlated_inputs(512, cols, seed=5)
    dead = torch.tensor([3, 17, 40, 63])
    x[:, dead] = 0.0
    q = gptq(w, _hessian(x), 3, 16, False, act_order=True)
    assert torch.isfinite(dequantize(q)).all()
    # static groups + no coupling to the others: a dead column gets exactly its round-to-nearest code
    assert torch.equal(codes(q).reshape(8, -1)[:, dead], codes(quantize(w, 3, 16, False)).reshape(8, -1)[:, dead])
    h = _hessian(torch.zeros(4, cols))  # all dead (an expert nothing reached): plain rounding
    assert torch.equal(gptq(w, h, 4, 32, True).packed, quantize(w, 4, 32, True).packed)


def test_indefinite_hessian_raises_damping_then_falls_back_to_rtn() -> None:
    k = 32
    w = torch.randn(6, k, generator=torch.Generator().manual_seed(6))
    # eigenvalues 2.05 and -0.05 (pairs): damping 0.01 * mean diag fails, the 10x retry succeeds
    mild = torch.eye(k)
    for i in range(0, k, 2):
        mild[i, i + 1] = mild[i + 1, i] = 1.05
    with warnings.catch_warnings():
        warnings.simplefilter("error", GPTQFallbackWarning)
        q = gptq(w, mild, 4, 16, False, act_order=False)
    assert not torch.equal(q.packed, quantize(w, 4, 16, False).packed)
    # eigenvalue -10 at mean diagonal 1: no damping up to 10x mean diag makes it positive definite
    bad = 11 * torch.ones(k, k) - 10 * torch.eye(k)
    with pytest.warns(GPTQFallbackWarning, match="rounded to nearest"):
        q = gptq(w, bad, 4, 16, False)
    assert torch.equal(q.packed, quantize(w, 4, 16, False).packed)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"bits": 5}, "bits must be one of"),
    ({"group": 24}, "group size must be one of"),
    ({"hessian": torch.eye(31)}, "Hessian is"),
    ({"hessian": torch.full((32, 32), float("nan"))}, "non-finite"),
    ({"damp": -0.1}, "damp must be"),
])
def test_gptq_refuses_bad_arguments(kwargs: dict, match: str) -> None:
    args = {"w": torch.randn(4, 32), "hessian": torch.eye(32), "bits": 4, "group": 16, "symmetric": False} | kwargs
    with pytest.raises(ValueError, match=match):
        gptq(**args)


# --- the quantize pass -------------------------------------------------------------------------------


def _run(model: moeopt.MoEModel, pipeline: str, log: list[str] | None = None) -> tuple[QuantReport, PassContext]:
    ctx = PassContext(log=(log.append if log is not None else lambda m: None))
    PassManager(pipeline, verify_each=True, ctx=ctx).run(model)
    report = ctx.analyses.peek(REPORT)
    assert isinstance(report, QuantReport)
    return report, ctx


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_gptq_pass_beats_rtn_and_stores_what_it_computes_with(arch: str) -> None:
    ids = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(5))
    ref = moeopt.load(tiny_model(arch)).logits(ids)
    err = {}
    for algo in ("rtn", "gptq"):
        model = moeopt.load(tiny_model(arch))
        report, _ = _run(model, f"quantize{{method=uniform,bits=2,group=16,algo={algo},calib-tokens=1024,seq-len=32}}")
        assert report.algo == algo and report.rtn_fallback == 0 and report.histogram() == {"2": report.histogram()["2"]}
        for layer in model.layers:
            t = layer.table
            for s in range(t.num_slots):
                for name in ("w_in", "w_out"):
                    q = t.quantized[f"{s}_{name}"]
                    packed = Quantized(q.rows, q.cols, q.bits, q.group_size, q.packed, q.scales, q.zero_points)
                    assert torch.equal(getattr(t, name)[s], dequantize(packed))
        err[algo] = float((model.logits(ids) - ref).pow(2).mean())
    assert err["gptq"] < 0.95 * err["rtn"], err
    assert "gptq" in report.summary().splitlines()[0]


@pytest.mark.parametrize(("bits", "group", "symmetric"), [(3, 256, True), (8, 128, False), (2, 32, False),
                                                        (4, 64, True)])
def test_gptq_pass_packs_every_format(bits: int, group: int, symmetric: bool) -> None:
    model = moeopt.load(tiny_model("olmoe"))  # hidden 32, intermediate 24: every group pads its one block
    report, _ = _run(model, f"quantize{{algo=gptq,method=uniform,bits={bits},group={group},symmetric={symmetric},"
                            f"act-order=false,damp=0.1,{CALIB}}}")
    assert report.histogram() == {str(bits): sum(layer.table.num_slots for layer in model.layers)}
    for layer in model.layers:
        t = layer.table
        for s in range(t.num_slots):
            q = t.quantized[f"{s}_w_out"]
            assert (q.bits, q.group_size, q.symmetric) == (bits, group, symmetric)
            packed = Quantized(q.rows, q.cols, q.bits, q.group_size, q.packed, q.scales, q.zero_points)
            assert torch.equal(t.w_out[s], dequantize(packed))


def test_sensitivity_measures_the_gptq_error_and_is_cached_per_algo() -> None:
    from moeopt.quant.expert_gptq import ExpertGPTQ
    from moeopt.quant.sensitivity import measure

    model = moeopt.load(tiny_model("mixtral"))
    batches = [torch.randint(0, 97, (8, 32), generator=torch.Generator().manual_seed(0))]
    gq = ExpertGPTQ(model, collect_hessians(model, batches)[0], 16, False)
    s_r = measure(model, batches, [2, 4], group=16, symmetric=False)
    s_g = measure(model, batches, [2, 4], group=16, symmetric=False, quantizer=gq.dequantized, algo="gptq")
    for b in (2, 4):
        total = {name: sum(cell[b] for row in s.errors for cell in row) for name, s in (("rtn", s_r), ("gptq", s_g))}
        assert total["gptq"] < total["rtn"], (b, total)
    assert not s_r.matches(model, "", 16, False, [2, 4], "gptq") and s_g.matches(model, "", 16, False, [2, 4], "gptq")
    # the pass does not take a cached RTN analysis for algo=gptq: this one would force an 8-bit expert
    errors = [[{None: 0.0, 2: 1e-6, 8: 0.0} for _ in range(4)] for _ in range(2)]
    errors[1][3] = {None: 0.0, 2: 1.0, 8: 0.5}
    steer = Sensitivity(16, False, 1, errors, [[0.25] * 4] * 2, "random tokens")
    bits = {}
    for algo in ("rtn", "gptq"):
        ctx = PassContext()
        ctx.analyses.put(SENSITIVITY, steer)
        PassManager(f"quantize{{algo={algo},avg-bits=3,candidates=2;8,group=16,{CALIB}}}", ctx=ctx).run(
            moeopt.load(tiny_model("mixtral")))
        bits[algo] = ctx.analyses.peek(REPORT).bits
    assert bits["rtn"][1][3] == 8 and bits["gptq"] != bits["rtn"]


def _unrouted_gpt_oss() -> moeopt.MoEModel:
    """Tiny gpt_oss whose slot 1 the router never picks (router bias -1e4) in every layer."""
    model = moeopt.load(tiny_model("gpt_oss"))
    for layer in model.layers:
        assert layer.router_bias is not None
        with torch.no_grad():
            layer.router_bias[1] = -1e4
    return model


def test_experts_without_calibration_tokens_fall_back_to_rtn_and_are_counted() -> None:
    model = _unrouted_gpt_oss()
    hess, tokens = collect_hessians(model, [torch.randint(0, 97, (2, 16))])
    assert tokens == 32 and all(row[1].routed == 0 and row[1].w_in.count == 0 for row in hess)
    log: list[str] = []
    with pytest.warns(RTNFallbackWarning, match="2 expert"):
        report, _ = _run(model, f"quantize{{algo=gptq,method=uniform,bits=4,group=16,scales=minmax,{CALIB}}}", log)
    n_layers = len(model.layers)
    assert report.rtn_fallback == n_layers and report.stats()["rtn-fallback"] == n_layers
    assert any("rounded to nearest instead of gptq" in line for line in report.summary().splitlines())
    assert [m for m in log if "warning" in m] == [
        f"quantize: warning: {n_layers} expert(s) (layer:slot 0:1, 1:1) rounded to nearest instead of GPTQ: no "
        "calibration tokens were routed to them (calibrate-all-experts=true sends every token to every expert)"]
    float_model = _unrouted_gpt_oss()
    for layer, ref in zip(model.layers, float_model.layers, strict=True):  # slot 1 is exactly RTN
        assert torch.equal(layer.table.quantized["1_w_in"].packed, quantize(ref.table.w_in[1], 4, 16, False).packed)
    # calibrate-all-experts: every token reaches every expert's Hessian, nothing falls back
    model = _unrouted_gpt_oss()
    hess, tokens = collect_hessians(model, [torch.randint(0, 97, (2, 16))], all_experts=True)
    assert all(c.w_in.count == tokens and c.w_out.count == tokens for row in hess for c in row)
    assert all(c.w_in is row[0].w_in for row in hess for c in row)  # one shared input Hessian per layer
    report, _ = _run(model, f"quantize{{algo=gptq,calibrate-all-experts=true,method=uniform,bits=4,group=16,{CALIB}}}")
    assert report.rtn_fallback == 0


def test_routed_hessians_count_the_routed_rows() -> None:
    model = moeopt.load(tiny_model("qwen3_moe"))
    hess, tokens = collect_hessians(model, [torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))])
    for layer, row in zip(model.layers, hess, strict=True):
        assert sum(c.routed for c in row) == tokens * layer.router.top_k  # each token reaches top_k slots
        assert all(c.w_in.count == c.routed == c.w_out.count for c in row)
        assert row[0].w_out.cols == layer.table.spec.intermediate


def test_gptq_model_lowers_with_parity_and_runs(tmp_path: Path) -> None:
    # One export (about a minute under load); the pass itself is checked on three architectures above.
    from moeopt.lower import lower
    from moeopt.runtime import Session
    from tests.lower_helpers import assert_decodes_like_torch, manifest

    model = moeopt.load(tiny_model("qwen3_moe"))
    _run(model, f"quantize{{algo=gptq,method=ilp,avg-bits=3,group=16,pin=0:0@2;0:1@3;1:0@8,{CALIB}}}")
    art = lower(model, tmp_path / "art", pipeline="test")  # verify=True: refused beyond the parity tolerance
    m = manifest(art)
    assert m["verified"] is True and m["parity_measured"] <= m["parity_tolerance"]
    assert [la["bits"] for la in m["layers"]] == [[s.bits for s in layer.table.slots] for layer in model.layers]
    # 8-bit groups run int8 activations (test_lower_quant's tolerance for them): 2% of the largest logit
    assert_decodes_like_torch(Session(art), model, 8, lambda ref: 2e-2 * float(np.abs(ref).max()))


def test_cli_bad_algo_and_width_are_one_line_and_write_nothing(tiny_ckpt: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from tests.test_cli import run_cli

    for passes, fragment in (
        ("quantize{algo=awq,method=uniform,bits=4}", "algo"),
        ("quantize{algo=gptq,method=uniform,bits=5}", "bitwidth '5' is not one of"),
        ("quantize{algo=gptq,avg-bits=3,candidates=4;6}", "bitwidth '6' is not one of"),
        ("quantize{algo=gptq,method=uniform,bits=4,group=24}", "group must be one of"),
        ("quantize{algo=gptq,method=uniform,bits=4,damp=-1}", "damp"),
    ):
        dest = tmp_path / "out"
        code, _, err = run_cli("convert", str(tiny_ckpt), "-o", str(dest), "--passes", passes, capsys=capsys)
        assert code == 2, (passes, err)
        assert len(err.strip().splitlines()) == 1 and fragment in err, (passes, err)
        assert not dest.exists(), passes


def test_gptq_options_round_trip_as_pipeline_text() -> None:
    from moeopt.passes import parse_pipeline

    text = "quantize{avg-bits=3,algo=gptq,calibrate-all-experts=true,act-order=false,damp=0.05}"
    assert parse_pipeline(text).text() == text


def test_slots_every_token_reaches_share_one_product_and_match_calibrate_all() -> None:
    import transformers

    from moeopt.testing import tiny_config

    cfg = tiny_config("mixtral")
    cfg.num_experts_per_tok = cfg.num_local_experts  # top-k = E (as the split SmolLM2): every slot sees every row
    torch.manual_seed(0)
    model = moeopt.load(transformers.MixtralForCausalLM(cfg).eval())
    batches = [torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))]
    routed, tokens = collect_hessians(model, batches)
    every, _ = collect_hessians(model, batches, all_experts=True)
    for row_r, row_a in zip(routed, every, strict=True):
        for r, a in zip(row_r, row_a, strict=True):
            assert r.routed == r.w_in.count == tokens and r.w_in is not a.w_in
            torch.testing.assert_close(r.w_in.value(), a.w_in.value(), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(r.w_out.value(), a.w_out.value(), rtol=1e-6, atol=1e-6)
