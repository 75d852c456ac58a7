"""Quantized lowering: artifacts of quantized (and pruned/merged + quantized) models against the PyTorch
dequantized reference, the exact conversions of the packed form, every group kind at the layer level,
and `moeopt eval` on an artifact.

Tolerances (max abs logit difference over 32 greedy steps, batch 4 left-padded and batch 1):
- kernels with fp32 activations (4-bit, 2-bit at block 16, widened 3-bit, float groups): 1e-4
  (measured ~1e-7, as the float artifacts);
- kernels that quantize activations to int8 (8-bit, 2-bit at blocks >= 32 on CPU, or accuracy_level=4):
  2% of the largest reference logit (measured ~0.1%).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from moeopt.errors import UnsupportedModelError
from moeopt.ir.layer import MoELayer
from moeopt.ir.spec import ExpertSpec, RouterSpec
from moeopt.ir.table import SlotInfo
from moeopt.lower.onnx_quant import QuantSettings, plan, quant_settings, to_ort
from moeopt.quant.apply import quantize_slot
from moeopt.quant.groupwise import Quantized, dequantize, quantize
from moeopt.runtime import Session
from tests.conftest import FIXTURE_DATA
from tests.lower_helpers import (
    QUANTIZED,
    artifact,
    assert_decodes_like_torch,
    export_layer,
    manifest,
    random_layer,
    source_model,
)

STEPS = 32
EXACT_TOL = 1e-4
INT8_REL_TOL = 2e-2


def _tolerance(m: dict, ref_logits: np.ndarray) -> float:
    """8-bit QMoE groups run int8 activations; every other group here fp32 ones (2-bit at block 16, and the
    MatMulNBits that a resident artifact at accuracy level 0 uses for 8-bit experts)."""
    has_int8 = any(g["bits"] == 8 and g["op"] == "com.microsoft.QMoE" for la in m["layers"] for g in la["groups"])
    return INT8_REL_TOL * float(np.abs(ref_logits).max()) if has_int8 else EXACT_TOL


@pytest.mark.parametrize("name", list(QUANTIZED))
def test_quantized_artifact_decodes_like_the_dequantized_model(
    name: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    art = artifact(name, tmp_path_factory)
    model = source_model(name, art)  # after the quantize pass: w_in / w_out hold the dequantized weights
    m = manifest(art)
    assert_decodes_like_torch(Session(art), model, STEPS, lambda ref: _tolerance(m, ref))
    # one QMoE node per quantized bitwidth group, one MoE node per float group; two MatMulNBits per expert
    # only for the int8-activation formats (8-bit here), which the resident lowering keeps exact
    groups = [g for la in m["layers"] for g in la["groups"]]
    exact = QuantSettings(0, exact=True)
    assert [(g["bits"], g["op"]) for g in groups] == [
        (g.bits, g.op) for layer in model.layers for g in plan(layer, exact)
    ]
    assert all(g["op"] == "com.microsoft.MatMulNBits" for g in groups if g["bits"] == 8)
    want: dict[str, int] = {}
    for g in groups:
        op_type = "com.microsoft.MoE" if g["bits"] is None else g["op"]
        want[op_type] = want.get(op_type, 0) + (2 * len(g["slots"]) if op_type.endswith("MatMulNBits") else 1)
    assert m["graph"]["ops"] == want
    assert [la["bits"] for la in m["layers"]] == [[s.bits for s in layer.table.slots] for layer in model.layers]


def test_mixed_and_compressed_artifacts_hold_what_was_asked(tmp_path_factory: pytest.TempPathFactory) -> None:
    mixed = manifest(artifact("mixtral_mixed", tmp_path_factory))
    bits = {b for la in mixed["layers"] for b in la["bits"]}
    assert {2, 3, None} <= bits and len(bits) >= 4  # the pins, plus what the ILP chose
    three = [g for la in mixed["layers"] for g in la["groups"] if g["bits"] == 3]
    assert three and all(g["stored_bits"] == 4 for g in three)  # widened codes
    comp = manifest(artifact("compressed_qwen3_q", tmp_path_factory))
    assert comp["layers"][0]["slot_of"] == [0, 0, 1, 2, 3, -1]  # pruned and merged experts survive lowering
    assert {g["padded_intermediate"] for la in comp["layers"] for g in la["groups"] if g["bits"]} == {32}


def test_quantized_artifact_stores_packed_weights_not_floats(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The float copies of quantized experts are dropped: 4-bit experts take about 1/5 of their fp32 bytes."""
    import onnx

    art = artifact("mixtral_q4", tmp_path_factory)
    names = {i.name for i in onnx.load(str(art / "model.onnx"), load_external_data=False).graph.initializer}
    assert not any(".table.w_in" in n or ".table.w_out" in n for n in names)
    model = source_model("mixtral_q4", art)
    fp32 = 4 * sum(p.numel() for p in model.hf.parameters())
    expert_fp32 = 4 * sum(la.table.w_in.numel() + la.table.w_out.numel() for la in model.layers)
    assert manifest(art)["files"]["model.onnx.data"]["bytes"] < fp32 - 0.7 * expert_fp32


# --- the packed form's conversions ----------------------------------------------------------------


def _as_quantized(q: object) -> Quantized:
    return Quantized(q.rows, q.cols, q.bits, q.group_size, q.packed, q.scales, q.zero_points)  # type: ignore[attr-defined]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("group", "block", "cols"), [(64, 64, 96), (64, 16, 96), (256, 128, 200), (32, 16, 40)])
def test_widening_and_reblocking_are_exact(bits: int, symmetric: bool, group: int, block: int, cols: int) -> None:
    w = torch.randn(6, cols, generator=torch.Generator().manual_seed(bits + cols))
    q = quantize(w, bits, group, symmetric)
    stored = Quantized(q.rows, q.cols, q.bits, q.group, q.packed, q.scales, q.zero_points)
    conv = to_ort(_qm(stored), block)
    assert conv.bits == (4 if bits == 3 else bits) and conv.group_size == block
    assert torch.equal(dequantize(_as_quantized(conv)), dequantize(stored))


def _qm(q: Quantized) -> object:
    from moeopt.ir.table import QuantizedMatrix

    return QuantizedMatrix(q.rows, q.cols, q.bits, q.group, q.symmetric, q.packed, q.scales, q.zero_points)


# --- layer level: every kind of group ---------------------------------------------------------------


def _quantized_layer(experts: ExpertSpec, bits: list[int | None], group: int = 16, symmetric: bool = False,
                     slots: list[SlotInfo] | None = None, top_k: int = 2) -> MoELayer:
    router = RouterSpec(len(bits) if slots is None else 6, top_k)
    layer = random_layer(router, experts, slots)
    for s, b in enumerate(bits):
        quantize_slot(layer.table, s, b, group, symmetric)
    return layer


H = 32
LAYERS = {
    # name: (layer, kernel of each quantized group, int8 activations)
    "glu-mixed-merged": (lambda: _quantized_layer(
        ExpertSpec(H, 24, "silu"), [4, 2, None, 3], slots=[SlotInfo((0, 5)), SlotInfo((1,)), SlotInfo((2, 4)),
                                                             SlotInfo((3,))]), "com.microsoft.QMoE", False),
    "mlp-relu-bias-float-slot": (lambda: _quantized_layer(ExpertSpec(H, 16, "relu", glu=False, bias=True),
                                                          [4, 4, None, 4]), "com.microsoft.QMoE", False),
    "group-256-symmetric": (lambda: _quantized_layer(ExpertSpec(H, 48, "silu"), [4, 4, 3, 4], group=256,
                                                     symmetric=True), "com.microsoft.QMoE", False),
    "gelu-glu-matmulnbits": (lambda: _quantized_layer(ExpertSpec(H, 24, "gelu"), [4, 3, None, 8]),
                             "com.microsoft.MatMulNBits", True),
    "hidden-not-whole-blocks": (lambda: _quantized_layer(ExpertSpec(24, 16, "silu"), [4, 4, 2, 4]),
                                "com.microsoft.MatMulNBits", False),
}


@pytest.mark.parametrize("case", list(LAYERS))
def test_quantized_layer_kinds_match(case: str, tmp_path: Path) -> None:
    build, kernel, int8 = LAYERS[case]
    layer = build()
    groups = plan(layer)
    assert {g.op for g in groups if g.bits is not None} == {kernel}, [g.to_dict() for g in groups]
    if kernel == "com.microsoft.MatMulNBits":
        assert all(g.why for g in groups if g.bits is not None)  # it says why QMoE could not
    sess = export_layer(layer, tmp_path / "layer.onnx")
    hid = layer.table.spec.hidden
    for shape in ((1, 1, hid), (3, 7, hid)):
        xs = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[1]))
        with torch.no_grad():
            ref = layer(xs).numpy()
        out = sess.run(None, {"x": xs.numpy()})[0]
        tol = INT8_REL_TOL * float(np.abs(ref).max()) if int8 else 1e-5
        assert np.abs(out - ref).max() <= tol, case


def test_int8_activations_are_close_and_recorded(tmp_path: Path) -> None:
    import onnx

    layer = _quantized_layer(ExpertSpec(H, 32, "silu"), [4, 4, 4, 4])
    with quant_settings(QuantSettings(accuracy_level=4)):
        sess = export_layer(layer, tmp_path / "layer.onnx")
    node = next(n for n in onnx.load(str(tmp_path / "layer.onnx")).graph.node if n.op_type == "QMoE")
    assert {a.name: a.i for a in node.attribute}["accuracy_level"] == 4
    xs = torch.randn(3, 7, H, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = layer(xs).numpy()
    assert np.abs(sess.run(None, {"x": xs.numpy()})[0] - ref).max() <= INT8_REL_TOL * float(np.abs(ref).max())
    from moeopt.lower.artifact import PARITY_TOL_EXACT, PARITY_TOL_INT8_ACTIVATIONS, parity_tolerance

    model = SimpleNamespace(layers=[layer])
    assert parity_tolerance(model, QuantSettings(accuracy_level=4)) == PARITY_TOL_INT8_ACTIVATIONS  # type: ignore[arg-type]
    assert parity_tolerance(model, QuantSettings(accuracy_level=0)) == PARITY_TOL_EXACT  # type: ignore[arg-type]


def test_inconsistent_packed_tables_are_refused(tmp_path: Path) -> None:
    from moeopt.lower import lower
    from tests.lower_helpers import tiny

    model = tiny("mixtral")
    quantize_slot(model.layers[0].table, 1, 4, 16, False)
    del model.layers[0].table.quantized["1_w_out"]
    with pytest.raises(UnsupportedModelError, match="layer 0 slot 1: 4-bit without a matching packed w_out"):
        lower(model, tmp_path / "art")
    assert not (tmp_path / "art").exists()


# --- eval on an artifact ------------------------------------------------------------------------------


def test_eval_accepts_an_artifact(tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]) -> None:
    """`moeopt eval ARTIFACT` scores with onnxruntime what `moeopt eval` scores with PyTorch."""
    import json

    from moeopt.eval import evaluate
    from moeopt.passes.calib import load_tokenizer
    from tests.test_cli import run_cli

    art = artifact("mixtral_q4", tmp_path_factory)
    out = tmp_path_factory.mktemp("eval") / "res.json"
    args = ("--data", str(FIXTURE_DATA), "--ppl", "news", "--tasks", "intent", "--ppl-tokens", "300",
            "--app-examples", "6")
    code, _, err = run_cli("eval", str(art), *args, "--json", str(out), capsys=capsys)
    assert code == 0, err
    got = json.loads(out.read_text())
    model = source_model("mixtral_q4", art)
    ref = evaluate(model.hf, load_tokenizer(model), data_root=FIXTURE_DATA, ppl=("news",), tasks=["intent"],
                   ppl_tokens=300, app_examples=6, progress=False)
    assert got["perplexity"]["news"]["ppl"] == pytest.approx(ref["perplexity"]["news"]["ppl"], rel=1e-4)
    assert got["apps"]["intent"]["accuracy"] == ref["apps"]["intent"]["accuracy"]
    code, _, err = run_cli("eval", str(art.parent / "nope"), *args, capsys=capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
