"""How much of the split SmolLM2 testbed's FFN weights each 4-bit grid reproduces exactly (issue 31).

The source is `SmolLM2-135M-Instruct.Q4_1.gguf`: every FFN weight already lies on llama.cpp's Q4_1 grid
(blocks of 32 along the row, 16 levels, a float step and a float minimum per block). A format with the
same blocks and a float minimum (Q4_1 itself; Q4_K's 32-weight sub-blocks up to its 6-bit scale/min
codes) can reproduce those weights, which flatters it on this testbed. moeopt's asymmetric format has
an INTEGER zero point (MatMulNBits' layout), so it reproduces them only where the block's minimum is a
whole number of steps. This prints both, and the squared error of moeopt's min/max RTN at groups 16/32/64.

    PYTHONPATH=. .venv/bin/python bench/q4_1_grid.py --model /tmp/smollm2-split --out bench/results/quantize-real
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open

from moeopt.quant.groupwise import fake_quantize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="split SmolLM2 folder (`moeopt import smollm2`)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    f = safe_open(str(args.model / "model.safetensors"), "pt")
    keys = [k for k in f.keys() if ".experts." in k]  # noqa: SIM118 (safe_open is not iterable)
    res: dict[str, object] = {"tensors": len(keys)}
    n = exact = near_int = blocks = 0
    for k in keys:
        w = f.get_tensor(k).float().reshape(-1, 32)  # rows are 576 / 192 long: whole, aligned blocks of 32
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        step = ((hi - lo) / 15).clamp(min=1e-30)
        rec = torch.round((w - lo) / step) * step + lo
        n += w.numel()
        exact += int(((rec - w).abs() <= 1e-6 * w.abs().amax()).sum())
        frac = -lo / step
        blocks += w.shape[0]
        near_int += int(((frac - frac.round()).abs() < 1e-3).sum())
    res["weights"] = n
    res["float_min_block32_4bit_exact_fraction"] = exact / n
    res["blocks_with_an_integer_zero_point"] = near_int / blocks
    for group in (32, 64, 16):
        same = 0
        se = energy = 0.0
        for k in keys:
            w = f.get_tensor(k).float()
            d = fake_quantize(w, 4, group, False)
            same += int((d == w).sum())
            se += float((d - w).pow(2).sum())
            energy += float(w.pow(2).sum())
        res[f"moeopt_rtn_u4_g{group}"] = {"exact_fraction": same / n, "relative_squared_error": se / energy}
    text = json.dumps(res, indent=1)
    print(text)
    if args.out is not None:
        (args.out / "q4_1_grid.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
