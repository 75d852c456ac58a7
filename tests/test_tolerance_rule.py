"""The parity tolerance is measured, not guessed (`moeopt.lower.tolerance`): PyTorch re-runs the parity
probe with the kernels' numerics simulated, and the artifact is held to max(1e-3, factor x that error).
The int8 simulation rounds activations as ORT's int8 kernels do (on the tiny models it reproduces the
artifact's logits to ~1e-8), so a correct int8 artifact passes and a changed router weight is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import moeopt
import moeopt.lower.artifact as artifact_mod
from moeopt.errors import VerificationError
from moeopt.lower import lower
from moeopt.lower.onnx_quant import QuantSettings
from moeopt.lower.tolerance import FACTOR_INT8, FLOOR, fake_int8, int8_sites
from moeopt.passes import PassManager
from moeopt.testing import tiny_model
from tests.test_lower_verify import _copy_export


def test_fake_int8_rounds_each_block_to_127_steps() -> None:
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    x[0, 16:32] = 0.0  # an all-zero block stays zero (no division by a zero scale)
    y = fake_int8(x, 16)  # blocks 0-15, 16-31, 32-39 (a partial last block)
    for lo, hi in ((0, 16), (16, 32), (32, 40)):
        scale = x[:, lo:hi].abs().amax(dim=-1, keepdim=True) / 127
        err = (y[:, lo:hi] - x[:, lo:hi]).abs()
        assert torch.all(err <= scale / 2 + 1e-7)
        steps = torch.where(scale > 0, y[:, lo:hi] / torch.where(scale > 0, scale, 1.0), 0.0)
        assert torch.allclose(steps, steps.round(), atol=1e-4)
    assert torch.equal(y[0, 16:32], torch.zeros(16))


def _model(passes: str) -> moeopt.MoEModel:
    model = moeopt.load(tiny_model("mixtral"))
    PassManager(passes).run(model)
    return model


def test_int8_sites_follow_the_kernels() -> None:
    q4 = _model("quantize{method=uniform,bits=4,group=16,non-experts=4}")
    lin, slots = int8_sites(q4, QuantSettings(4, exact=True))
    assert len(slots) == sum(la.table.num_slots for la in q4.layers) and len(lin) == len(q4.linears) > 0
    assert int8_sites(q4, QuantSettings(0, exact=True)) == ({}, {})  # fp32 activations everywhere
    q8 = _model("quantize{method=uniform,bits=8,group=16}")
    assert int8_sites(q8, QuantSettings(0, exact=True)) == ({}, {})  # resident: 8-bit through MatMulNBits
    assert len(int8_sites(q8, QuantSettings(0, exact=False))[1]) == 8  # offload: 8-bit QMoE, int8 always


def test_int8_artifact_is_held_to_its_error_model_and_a_fault_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model("quantize{method=uniform,bits=4,group=16}")  # (the copied export below matches no linears)
    lower(model, tmp_path / "art", accuracy_level=4)
    m = json.loads((tmp_path / "art" / "manifest.json").read_text())
    rule = m["parity_rule"]
    assert rule["kind"] == "int8-activations" and rule["int8_sites"]["expert_slots"] == 8
    simulated = rule["simulated_max_abs_diff"]
    assert m["parity_tolerance"] == pytest.approx(max(FLOOR, FACTOR_INT8 * simulated))
    assert m["verified"] and abs(m["parity_measured"] - simulated) <= 1e-3 * simulated + 1e-6  # same rounding
    monkeypatch.setattr(artifact_mod, "export_decoder", _copy_export(tmp_path / "art", fault=True))
    with pytest.raises(VerificationError, match="over its tolerance") as err:
        lower(model, tmp_path / "bad", accuracy_level=4)
    measured = float(str(err.value).split(" by ")[1].split()[0])
    assert measured > 2 * m["parity_tolerance"], measured
    assert not (tmp_path / "bad").exists()


def test_exact_artifact_keeps_the_floor(tmp_path: Path) -> None:
    lower(_model("quantize{method=uniform,bits=4,group=16}"), tmp_path / "art")
    m = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert m["parity_rule"]["kind"] == "fp32-order" and m["parity_tolerance"] == FLOOR
    assert 0 < m["parity_rule"]["simulated_max_abs_diff"] < FLOOR / 100 and np.isfinite(m["parity_measured"])
