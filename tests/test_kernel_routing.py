"""Kernel routing: a layer whose quantized experts are one QMoE node routes inside that node from the
router logits (softmax over the top-k logits) instead of through the graph's canonical router, where the
two are the same function (`onnx_quant.kernel_routing`). The lowered artifact must still match PyTorch at
the exact tolerance, and every layer that the rule excludes must keep the graph's router."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import torch

import moeopt
from moeopt.lower import lower
from moeopt.lower.onnx_quant import QuantSettings, kernel_routing
from moeopt.passes import PassManager
from moeopt.testing import tiny_model


def _q4(arch: str = "mixtral", extra: str = "") -> moeopt.MoEModel:
    model = moeopt.load(tiny_model(arch))
    PassManager(f"quantize{{method=uniform,bits=4,group=16{extra}}}").run(model)
    return model


def test_which_layers_route_in_the_kernel() -> None:
    model = _q4()
    assert [kernel_routing(la) for la in model.layers] == ["", ""]  # softmax, top-2, renormalised: Mixtral
    assert "off" in kernel_routing(model.layers[0], QuantSettings(kernel_routing=False))
    with torch.no_grad():  # an untrained router: every logit ties, and QMoE breaks ties unlike torch
        model.layers[0].router_weight.zero_()
    assert "equal" in kernel_routing(model.layers[0])
    assert "not one QMoE node" in kernel_routing(_q4(extra=",pin=0:0@2").layers[0])  # two bitwidth groups
    qwen = _q4("qwen2_moe")  # no renormalisation over the chosen experts: not QMoE's softmax over the top-k
    assert "is not QMoE's softmax" in kernel_routing(qwen.layers[0])


def test_kernel_routed_artifact_matches_pytorch(tmp_path: Path) -> None:
    model = _q4()
    lower(model, tmp_path / "art")
    m = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert [la["routing"] for la in m["layers"]] == ["qmoe", "qmoe"]
    assert m["verified"] and m["parity_tolerance"] == 1e-3 and m["parity_measured"] <= 1e-5
    graph = onnx.load(str(tmp_path / "art" / "model.onnx"), load_external_data=False).graph
    qmoe = [n for n in graph.node if n.op_type == "QMoE"]
    assert len(qmoe) == 2 and not any(n.op_type in ("TopK", "ScatterElements") for n in graph.node)
    assert all(len(n.input) < 15 or not n.input[14] for n in qmoe)  # no router_weights: the kernel weights
