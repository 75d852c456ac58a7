"""bench/runtime.py's bytes-per-token estimate (the roofline's denominator): the non-expert linears that
`quantize{non-experts=4,lm-head=true}` lowers to MatMulNBits count at their packed size, not as fp32.
The bug it guards: every non-expert parameter counted at 4 bytes, so the all-linears-4-bit artifact's
roofline (and its bytes against llama.cpp Q4_K_M's) came out as if attention and lm_head were float.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import torch

import moeopt
from moeopt.passes import PassManager
from moeopt.quant import linears
from tests.lower_helpers import reference_like_mixtral

EXPERTS_ONLY = "quantize{method=uniform,bits=4,group=16}"
ALL_LINEARS = "quantize{method=uniform,bits=4,group=16,non-experts=4,lm-head=true}"


def _bench() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "bench" / "runtime.py"
    spec = importlib.util.spec_from_file_location("moeopt_bench_runtime", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_active_bytes_counts_matmulnbits_linears_packed() -> None:
    torch.set_num_threads(1)
    bench = _bench()
    experts_only = moeopt.load(reference_like_mixtral())
    PassManager(EXPERTS_ONLY).run(experts_only)
    everything = moeopt.load(reference_like_mixtral())
    PassManager(ALL_LINEARS).run(everything)
    a, b = bench.active_bytes(experts_only), bench.active_bytes(everything)
    assert a["non_expert_linears_packed"] == 0 and b["non_expert_linears_packed"] == len(everything.linears) > 0
    # the same experts; every packed linear trades its fp32 weight for its packed bytes. The tied
    # embedding counts once either way: as lm_head when tied, and the untied copy is the packed lm_head.
    float_linears = sum(4 * q.rows * q.cols for q in everything.linears.values())
    packed = linears.stored_bytes(everything)
    assert b["non_expert_packed_bytes"] == packed
    assert b["active_bytes_per_token"] == a["active_bytes_per_token"] - float_linears + packed
    assert b["active_bytes_per_token"] < a["active_bytes_per_token"]
