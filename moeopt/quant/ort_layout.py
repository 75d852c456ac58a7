"""A quantized ExpertTable as the inputs of ONNX Runtime's quantized ops, with no repacking of bits.

`matmul_nbits_inputs` gives one matrix as `com.microsoft.MatMulNBits` inputs; `qmoe_group` stacks the
slots of one bitwidth as `com.microsoft.QMoE` inputs (one node per bitwidth: a mixed layer becomes one
node per group whose outputs add). GLU experts' gate/up rows are interleaved (g0, u0, g1, u1, ...) for
`swiglu_fusion=1`; rows are independent in the block layout, so that is a row gather, not a repack.
Measured limits of the CPU kernels (onnxruntime 1.32) are in tests/test_quant_qmoe.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moeopt.ir.table import ExpertTable


@dataclass(frozen=True)
class QMoEGroup:
    """QMoE inputs for the slots of one bitwidth (E = len(slots)); zero points None when symmetric."""

    slots: tuple[int, ...]
    bits: int
    block_size: int
    fc1: np.ndarray  # uint8 (E, F, kb1 * blob)
    fc1_scales: np.ndarray  # float32 (E, F, kb1)
    fc1_zero_points: np.ndarray | None  # uint8 (E, F, ceil(kb1 * bits / 8))
    fc2: np.ndarray  # uint8 (E, H, kb2 * blob)
    fc2_scales: np.ndarray  # float32 (E, H, kb2)
    fc2_zero_points: np.ndarray | None

    def attributes(self, glu: bool) -> dict[str, Any]:
        """QMoE attributes that describe these weights (k, activation and routing are the caller's)."""
        out: dict[str, Any] = {"expert_weight_bits": self.bits, "block_size": self.block_size, "weights_prepacked": 0}
        if glu:
            out["swiglu_fusion"] = 1
        return out


def bit_groups(table: ExpertTable) -> dict[int | None, list[int]]:
    """Slots by bitwidth (None = float), in slot order."""
    out: dict[int | None, list[int]] = {}
    for s, info in enumerate(table.slots):
        out.setdefault(info.bits, []).append(s)
    return out


def matmul_nbits_inputs(table: ExpertTable, slot: int, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None,
                                                                            dict[str, int]]:
    """(B [N, k_blocks, blob], scales [N * k_blocks], zero_points flat or None, attributes K/N/bits/block_size)."""
    q: Any = table.quantized[f"{slot}_{name}"]
    kb = q.scales.shape[1]
    b = q.packed.numpy().reshape(q.rows, kb, -1)
    zp = None if q.zero_points is None else q.zero_points.numpy().reshape(-1)
    attrs = {"K": q.cols, "N": q.rows, "bits": q.bits, "block_size": q.group_size}
    return b, q.scales.float().numpy().reshape(-1), zp, attrs


def glu_interleave(inter: int) -> torch.Tensor:
    """Row order g0, u0, g1, u1, ... of a [gate; up] (2I, H) matrix."""
    return torch.stack([torch.arange(inter), torch.arange(inter) + inter], 1).reshape(-1)  # (2I,)


def qmoe_group(table: ExpertTable, slots: list[int]) -> QMoEGroup:
    """Stack the packed weights of `slots` (all of one bitwidth and format) as QMoE inputs."""
    first: Any = table.quantized[f"{slots[0]}_w_in"]
    fmt = (first.bits, first.group_size, first.symmetric)
    mats: dict[str, list[Any]] = {"w_in": [], "w_out": []}
    for s in slots:
        for name in mats:
            q: Any = table.quantized[f"{s}_{name}"]
            if (q.bits, q.group_size, q.symmetric) != fmt:
                raise ValueError(f"slot {s} {name} is {q.bits}-bit/{q.group_size}, the group is {fmt[0]}-bit/{fmt[1]}")
            mats[name].append(q)
    rows = glu_interleave(table.spec.intermediate) if table.spec.glu else None

    def stack(qs: list[Any], attr: str, order: torch.Tensor | None) -> np.ndarray:
        ts = [getattr(q, attr) for q in qs]
        if attr == "scales":  # float16 storage is cast here; `moeopt.lower.half_scales` stores it back in the graph
            ts = [t.float() for t in ts]
        return torch.stack([t if order is None else t[order] for t in ts]).numpy()

    def zps(qs: list[Any], order: torch.Tensor | None) -> np.ndarray | None:
        return None if fmt[2] else stack(qs, "zero_points", order)

    return QMoEGroup(
        tuple(slots), fmt[0], fmt[1],
        stack(mats["w_in"], "packed", rows), stack(mats["w_in"], "scales", rows), zps(mats["w_in"], rows),
        stack(mats["w_out"], "packed", None), stack(mats["w_out"], "scales", None), zps(mats["w_out"], None),
    )
