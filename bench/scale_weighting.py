"""Which weighting the scale search should minimise: PyTorch perplexity of the split SmolLM2 at the bench's positions.

Each variant fake-quantizes every routed-expert matrix (RTN, asymmetric, group G) with min/max scales
(`minmax`), with `groupwise.search_params` as shipped (`absw`: weights rms(block) + |x|, llama.cpp's
make_qkx2 ones) or with weights x^2 (`sq`), then scores the same 1,270 positions as
bench/quantize_real.py (10 windows of 256, the second half of each) in PyTorch. PyTorch and the lowered
artifact agree here (RTN u4 minmax: 27.675 on both), so this is a cheap way to choose before lowering.

    PYTHONPATH=. .venv/bin/python bench/scale_weighting.py --model DIR --text WORK/eval.txt 4:64:minmax 3:64:absw
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quantize_real as qr

import moeopt
from moeopt.quant import groupwise as gw


def _sq(blk: torch.Tensor) -> torch.Tensor:
    """Importance that turns search_params' rms + |x| weights into x^2 (plus a floor)."""
    ms = blk.pow(2).mean(-1, keepdim=True)
    return (blk.pow(2) + 1e-4 * ms) / (blk.abs() + ms.sqrt()).clamp(min=1e-30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--text", type=Path, required=True, help="the bench's eval.txt (bench/quantize_real.py --work)")
    ap.add_argument("variants", nargs="+", help="BITS:GROUP:minmax|absw|sq")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from tokenizers import Tokenizer

    model = moeopt.load(args.model)
    ids = Tokenizer.from_file(str(args.model / "tokenizer.json")).encode(args.text.read_text(),
                                                                          add_special_tokens=False).ids
    stream = qr.model_stream(ids, 256, None)
    orig = [(layer.table.w_in.detach().clone(), layer.table.w_out.detach().clone()) for layer in model.layers]
    for spec in args.variants:
        bits_s, group_s, weight = spec.split(":")
        bits, group = int(bits_s), int(group_s)
        t = time.time()
        for layer, pair in zip(model.layers, orig, strict=True):
            for name, src in zip(("w_in", "w_out"), pair, strict=True):
                dst = getattr(layer.table, name)
                for s in range(src.shape[0]):
                    w = src[s].float()
                    blk = gw._blocks(w, group)
                    if weight == "minmax":
                        scale, zp = gw.block_params(blk, bits, False)
                    else:
                        scale, zp = gw.search_params(blk, bits, False, None if weight == "absw" else _sq(blk))
                    q = gw.round_codes(blk, scale, zp, bits)
                    with torch.no_grad():
                        dst[s] = ((q - zp[..., None]) * scale[..., None]).reshape(w.shape[0], -1)[:, : w.shape[1]]
        with torch.no_grad():
            r = qr.score(model.hf, stream, 256)
        print(spec, round(r["ppl"], 3), f"{time.time() - t:.0f}s", flush=True)


if __name__ == "__main__":
    main()
