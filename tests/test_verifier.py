"""The verifier rejects hand-corrupted IRs and names layer, expert and invariant."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moeopt
from moeopt.ir.table import QuantizedMatrix, SlotInfo
from moeopt.ir.verify import check
from moeopt.testing import tiny_model


@pytest.fixture
def model() -> moeopt.MoEModel:
    return moeopt.load(tiny_model("mixtral"))


def _invariants(model: moeopt.MoEModel) -> set[str]:
    return {p.invariant for p in check(model)}


def test_clean_model_verifies(model: moeopt.MoEModel) -> None:
    moeopt.verify(model)
    assert check(model) == []


def test_wrong_router_width(model: moeopt.MoEModel) -> None:
    layer = model.layers[1]
    layer.router_weight = nn.Parameter(torch.zeros(3, 32), requires_grad=False)
    with pytest.raises(moeopt.VerificationError, match=r"layer 1: router-width"):
        moeopt.verify(model)


def test_dangling_slot(model: moeopt.MoEModel) -> None:
    model.layers[0].table.slot_of[2] = 9
    with pytest.raises(moeopt.VerificationError, match=r"layer 0, expert 2: dangling-slot"):
        moeopt.verify(model)


def test_missing_scale(model: moeopt.MoEModel) -> None:
    t = model.layers[0].table
    t.with_slot_info(1, bits=4)
    assert "missing-scale" in _invariants(model)
    q = QuantizedMatrix(96, 32, 4, 32, True, torch.zeros(96, 16, dtype=torch.uint8), torch.empty(0), None)
    t.quantized["1_w_in"] = q
    t.quantized["1_w_out"] = q
    with pytest.raises(moeopt.VerificationError, match=r"missing-scale: slot 1 is 4-bit but w_in has no scales"):
        moeopt.verify(model)


def test_orphan_slot_and_pruned_still_mapped(model: moeopt.MoEModel) -> None:
    t = model.layers[0].table
    t.keep_mask[3] = False
    assert {"pruned-slot"} <= _invariants(model)
    t.slot_of[3] = -1
    assert "orphan-slot" in _invariants(model)


def test_top_k_larger_than_kept(model: moeopt.MoEModel) -> None:
    t = model.layers[0].table
    t.set_slots(t.w_in[:1], t.w_out[:1], [SlotInfo((0,))])
    with pytest.raises(moeopt.VerificationError, match="top-k"):
        moeopt.verify(model)


def test_error_counts_further_problems(model: moeopt.MoEModel) -> None:
    t = model.layers[0].table
    t.slot_of[0] = 7
    t.slot_of[1] = 8
    with pytest.raises(moeopt.VerificationError, match=r"\(\+\d+ more\)"):
        moeopt.verify(model)
