"""`graph_passes.fuse_qkv`: in GroupQueryAttention graphs the q, k, v projections become one projection
read as packed QKV - float MatMuls and 4-bit MatMulNBits alike - and the artifact still matches PyTorch
at the exact tolerance (a wrong row order or a dropped zero point would move the logits by far more)."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch

import moeopt
from moeopt.lower import lower
from moeopt.passes import PassManager
from tests.test_decode_gqa import _mixtral_hd16


@pytest.mark.parametrize("passes", ["", "quantize{method=uniform,bits=4,group=16,non-experts=4}"])
def test_qkv_fused_into_packed_gqa(passes: str, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    model = moeopt.load(_mixtral_hd16())
    if passes:
        PassManager(passes).run(model)
    lower(model, tmp_path / "art", attention="gqa")
    m = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert m["verified"] and m["parity_tolerance"] == 1e-3 and m["parity_measured"] <= 1e-5
    graph = onnx.load(str(tmp_path / "art" / "model.onnx"), load_external_data=False).graph
    producers = {o: n for n in graph.node for o in n.output}
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2
    for node in gqa:
        assert list(node.input[1:3]) == ["", ""]  # packed QKV: no separate key / value
        proj = producers[node.input[0]]
        assert proj.op_type == ("MatMulNBits" if passes else "MatMul")
        if passes:  # q (4 heads x 16) + k + v (2 kv heads x 16 each) rows
            n = next(a.i for a in proj.attribute if a.name == "N")
            assert n == 64 + 2 * 32
