"""GPTQ vs RTN on the split SmolLM2's FFN experts (real weights), PyTorch numerics: demo wiki/news perplexity.

    moeopt import smollm2 -o /tmp/gptq-smol/split
    PYTHONPATH=. python bench/results/quantize-gptq/smollm2_run.py bench/results/quantize-gptq/smollm2-ffn.json

Rows already in the JSON are skipped (the run resumes). CALIB is the prepared news train text.
"""

import json
import sys
import time
from pathlib import Path

import torch

import moeopt
from moeopt.eval import evaluate
from moeopt.passes import PassContext, PassManager
from moeopt.passes.calib import load_tokenizer
from moeopt.passes.quantize import REPORT

SPLIT = Path("/tmp/gptq-smol/split")
DEMO = Path("moeopt/assets/demo-data")
CALIB = "/tmp/gptq-data/data/lm/news/train.jsonl"


def main() -> None:
    torch.set_num_threads(2)
    out = Path(sys.argv[1])
    rows = json.loads(out.read_text()) if out.exists() else {}
    configs = [("float", "")] + [
        (f"{a}-{b}", f"quantize{{method=uniform,bits={b},group=64,algo={a},calib={CALIB},calib-tokens=4096,"
                     "seq-len=256}")
        for b in (4, 3, 2) for a in ("rtn", "gptq")
    ]
    for label, text in configs:
        if label in rows:
            continue
        t = time.perf_counter()
        m = moeopt.load(SPLIT)
        fallback = 0
        if text:
            ctx = PassContext()
            PassManager(text, ctx=ctx).run(m)
            fallback = ctx.analyses.peek(REPORT).rtn_fallback
        tq = time.perf_counter() - t
        res = evaluate(m.hf, load_tokenizer(m), data_root=DEMO, ppl=("wiki", "news"), tasks=[], ppl_tokens=None,
                       context=256, progress=False)
        rows[label] = {"pipeline": text, "ppl": {k: v["ppl"] for k, v in res["perplexity"].items()},
                       "tokens": {k: v["tokens"] for k, v in res["perplexity"].items()},
                       "quantize_s": round(tq, 1), "total_s": round(time.perf_counter() - t, 1),
                       "rtn_fallback": fallback}
        print(label, rows[label], flush=True)
        out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
