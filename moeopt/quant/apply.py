"""Writing a chosen bitwidth into an ExpertTable: packed form in `table.quantized`, dequantized floats
in `w_in` / `w_out` (the reference numerics), bits in the slot record."""

from __future__ import annotations

from collections.abc import Callable

import torch

from moeopt.ir.table import ExpertTable, QuantizedMatrix
from moeopt.quant.groupwise import Quantized, Search, dequantize, matrix_bytes, quantize_dequantize, searched

FLOAT_BYTES = 2  # keep-float experts are costed as fp16, the format they would ship in


def slot_params(table: ExpertTable) -> int:
    """Weights of one slot (w_in + w_out; biases are left in float and not counted)."""
    return int(table.w_in[0].numel() + table.w_out[0].numel()) if table.num_slots else 0


def slot_bytes(table: ExpertTable, bits: int | None, group: int, symmetric: bool) -> int:
    """Stored bytes of one slot at `bits` (None = float at FLOAT_BYTES), as ExpertTable.expert_bytes counts."""
    if bits is None:
        return slot_params(table) * FLOAT_BYTES
    f, h = table.spec.in_rows, table.spec.hidden
    return matrix_bytes(f, h, bits, group, symmetric) + matrix_bytes(h, table.spec.intermediate, bits, group, symmetric)


def quantize_slot(
    table: ExpertTable, slot: int, bits: int | None, group: int, symmetric: bool,
    quantizer: Callable[[str, int], Quantized] | None = None, search: Search = False,
) -> None:
    """Quantize one slot in place (bits None: leave it float and drop any packed form).

    `quantizer(name, bits)` gives the packed "w_in" / "w_out" (e.g. GPTQ's, in the same format);
    round-to-nearest by default (`search`: with searched scales, `groupwise.search_params`).
    """
    for name in ("w_in", "w_out"):
        key = f"{slot}_{name}"
        if bits is None:
            if key in table.quantized:
                del table.quantized[key]
            continue
        weight = getattr(table, name)  # (S, rows, cols)
        w = weight[slot]
        if quantizer is None:
            q, deq = quantize_dequantize(w, bits, group, symmetric, searched(search, bits))
        else:
            q = quantizer(name, bits)
            deq = dequantize(q)
        if (q.rows, q.cols, q.bits, q.group, q.symmetric) != (*w.shape, bits, group, symmetric):
            raise ValueError(f"slot {slot} {name}: the quantizer returned a different format")
        table.quantized[key] = QuantizedMatrix(
            q.rows, q.cols, bits, group, symmetric, q.packed, q.scales, q.zero_points
        )
        with torch.no_grad():
            weight[slot] = deq.to(weight.dtype)
    table.with_slot_info(slot, bits=bits)
