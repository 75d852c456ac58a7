"""GPTQ vs RTN on the split SmolLM2 (real weights), PyTorch numerics: perplexity of the demo wiki/news test text."""
import json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(2)
import moeopt
from moeopt.eval import evaluate
from moeopt.passes import PassContext, PassManager
from moeopt.passes.calib import load_tokenizer
from moeopt.passes.quantize import REPORT

SPLIT = Path("/tmp/gptq-smol/split")
DEMO = Path("moeopt/assets/demo-data")
CALIB = "/tmp/gptq-data/data/lm/news/train.jsonl"
out = Path(sys.argv[1]); rows = json.loads(out.read_text()) if out.exists() else {}
configs = [("float", "")] + [(f"{a}-{b}", f"quantize{{method=uniform,bits={b},group=64,algo={a},calib={CALIB},"
                                         f"calib-tokens=4096,seq-len=256}}") for b in (4, 3, 2) for a in ("rtn", "gptq")]
for label, text in configs:
    if label in rows:
        continue
    t = time.perf_counter()
    m = moeopt.load(SPLIT)
    if text:
        ctx = PassContext()
        PassManager(text, ctx=ctx).run(m)
        rep = ctx.analyses.peek(REPORT)
    tq = time.perf_counter() - t
    res = evaluate(m.hf, load_tokenizer(m), data_root=DEMO, ppl=("wiki", "news"), tasks=[], ppl_tokens=None,
                   context=256, progress=False)
    rows[label] = {"pipeline": text, "ppl": {k: v["ppl"] for k, v in res["perplexity"].items()},
                   "tokens": {k: v["tokens"] for k, v in res["perplexity"].items()},
                   "quantize_s": round(tq, 1), "total_s": round(time.perf_counter() - t, 1),
                   "rtn_fallback": rep.rtn_fallback if text else 0}
    print(label, rows[label], flush=True)
    out.write_text(json.dumps(rows, indent=1))
