"""Expert quantization quality vs bytes on the reference model: uniform 8/4/3/2 bits against ILP (and
greedy) allocations at average 4, 3 and 2.5 bits, optionally after a compression pipeline (`--pre`),
for each rounding algorithm in `--algos` (rtn, gptq; gptq runs are labelled `gptq-...` and calibrate on
`--calib`, uniform ones included). Perplexity and per-app accuracy through `moeopt.eval`, with caps that
keep a run to minutes on 2 cores. Writes results.json, table.md and quality_vs_bytes.png.

    .venv/bin/python bench/quantize.py --out bench/results/quantize
    .venv/bin/python bench/quantize.py --algos rtn,gptq --only uniform-8,uniform-4,uniform-3,uniform-2 \
        --out bench/results/quantize-gptq
    .venv/bin/python bench/quantize.py --pre "importance{calib=app:intent},prune{keep=0.5,cold=0.25},match,merge"
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
from common import reference_parser  # bench/common.py (the script's folder is on sys.path)

import moeopt
from moeopt.data.apps import APPS
from moeopt.eval import evaluate
from moeopt.passes import PassContext, PassManager
from moeopt.passes.calib import load_tokenizer
from moeopt.passes.quantize import REPORT, SENSITIVITY, calibration_batches
from moeopt.quant.sensitivity import measure


def configs(group: int, calib: str, calib_tokens: int, greedy: bool, metric: str, algo: str = "rtn",
            all_experts: bool = False) -> list[tuple[str, str]]:
    """(label, pipeline) per run; the RTN ILP/greedy runs share one sensitivity analysis (GPTQ ones measure
    their own: the allocation weighs GPTQ's error). Labels of non-RTN runs start with the algorithm."""
    common = f"group={group}"
    calibrated = f"calib={calib},calib-tokens={calib_tokens}"
    if algo != "rtn":
        common += f",algo={algo}" + (",calibrate-all-experts=true" if all_experts else "")
    measured = f"{common},{calibrated},metric={metric}"
    uniform = common if algo == "rtn" else f"{common},{calibrated}"
    out = [(f"uniform-{b}", f"quantize{{method=uniform,bits={b},{uniform}}}") for b in (8, 4, 3, 2)]
    out += [(f"ilp-{a:g}", f"quantize{{avg-bits={a:g},{measured}}}") for a in (4, 3, 2.5)]
    if greedy:
        out += [(f"greedy-{a:g}", f"quantize{{method=greedy,avg-bits={a:g},{measured}}}") for a in (4, 3, 2.5)]
    return out if algo == "rtn" else [(f"{algo}-{label}", text) for label, text in out]


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    base = moeopt.load(args.model)
    # The reference config keeps the training setting output_router_logits=True, which canonical layers
    # cannot serve (they return no router logits): plain inference turns it off, as the model card says.
    if getattr(base.config, "output_router_logits", False):
        base.config.output_router_logits = False
    tok = load_tokenizer(base)
    apps = list(APPS) if args.apps == "all" else args.apps.split(",")
    ev: dict[str, Any] = dict(data_root=args.data, ppl=args.ppl, tasks=apps, app_examples=args.app_examples,
                              ppl_tokens=args.ppl_tokens, progress=False)
    t0 = time.perf_counter()
    fp16_original = sum(layer.table.expert_bytes(2) for layer in base.layers)
    original = None
    if args.pre:  # the uncompressed model is the reference the combined savings are judged against
        original = _row("original", "", evaluate(base.hf, tok, **ev), apps, fp16_original, fp16_original, 16.0, 16.0,
                        time.perf_counter() - t0)
        original["vs_original_fp16"] = 1.0
        print(_line(original), flush=True)
        PassManager(args.pre, verify_each=True).run(base)
    reference = evaluate(base.hf, tok, **ev)
    fp16 = sum(layer.table.expert_bytes(2) for layer in base.layers)
    results: dict[str, Any] = {
        "model": str(args.model), "pre": args.pre, "apps": apps, "group": args.group, "calib": args.calib,
        "metric": args.metric, "algos": args.algos.split(","), "all_experts": args.all_experts,
        "eval": {k: v for k, v in ev.items() if k != "data_root"} | {"data_root": str(args.data)},
        "float": _row("compressed" if args.pre else "float", args.pre, reference, apps, fp16, fp16, 16.0, 16.0,
                      time.perf_counter() - t0),
        "runs": [], "fp16_original_bytes": fp16_original, "original": original,
    }
    results["float"]["vs_original_fp16"] = fp16_original / fp16
    print(_line(results["float"]), flush=True)
    specs = tuple(s for s in args.calib.split(";") if s)
    batches = calibration_batches(base, specs, 128, args.calib_tokens, 0, args.data)
    sens = None
    runs = [(algo, label, text) for algo in args.algos.split(",")
            for label, text in configs(args.group, args.calib, args.calib_tokens, args.greedy, args.metric, algo,
                                       args.all_experts)]
    for algo, label, text in runs:
        if args.only and label.removeprefix(f"{algo}-") not in args.only.split(","):
            continue
        if sens is None and algo == "rtn" and "method=uniform" not in text:
            sens = measure(base, batches, [2, 3, 4, 8], group=args.group, symmetric=False, source=args.calib,
                           progress=True)
        t = time.perf_counter()
        model = copy.deepcopy(base)
        ctx = PassContext(data_root=args.data, log=lambda msg: print(msg) if "warning" in msg else None)
        if sens is not None:
            ctx.analyses.put(SENSITIVITY, sens)  # measured once on the (compressed) float model (RTN's)
        PassManager(text, verify_each=True, ctx=ctx).run(model)
        rep = ctx.analyses.peek(REPORT)
        res = evaluate(model.hf, tok, **ev)
        row = _row(label, text, res, apps, rep.total_bytes, fp16, rep.nominal_bits(), rep.effective_bits(),
                   time.perf_counter() - t)
        row["histogram"], row["layer_bytes"], row["error"] = rep.histogram(), rep.layer_bytes, rep.error
        row["algo"], row["rtn_fallback"] = rep.algo, rep.rtn_fallback
        row["vs_original_fp16"] = fp16_original / rep.total_bytes  # with --pre: compression x quantization
        results["runs"].append(row)
        print(_line(row), flush=True)
        if args.out is not None:  # partial results survive an interrupted run
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def _row(label: str, text: str, res: dict[str, Any], apps: list[str], nbytes: int, fp16: int, bits: float,
         eff: float, seconds: float) -> dict[str, Any]:
    accs = {a: float(res["apps"][a]["accuracy"]) for a in apps}
    return {
        "label": label, "pipeline": text, "ppl": {k: float(v["ppl"]) for k, v in res["perplexity"].items()},
        "apps": accs, "mean_app_acc": sum(accs.values()) / max(len(accs), 1), "expert_bytes": nbytes,
        "vs_fp16": fp16 / nbytes, "avg_bits": round(bits, 4), "effective_bits": round(eff, 4),
        "seconds": round(seconds, 1),
    }


def _line(r: dict[str, Any]) -> str:
    ppl = " ".join(f"ppl/{k} {v:.2f}" for k, v in r["ppl"].items())
    return (f"{r['label']:<11} {r['expert_bytes'] / 1e6:8.3f} MB ({r['vs_fp16']:.2f}x) bits {r['avg_bits']:<6} "
            f"{ppl}  mean acc {r['mean_app_acc']:.4f}  ({r['seconds']:.0f}s)")


def table(results: dict[str, Any]) -> str:
    """Markdown: one row per run, with perplexity and accuracy relative to the float model."""
    ref = results["float"]
    corpora = list(ref["ppl"])
    head = ("| run | expert MB | vs fp16 | vs original fp16 | bits | stored bits | "
            + " | ".join(f"ppl/{c}" for c in corpora) + " | Δppl | mean acc | Δacc (pt) |")
    lines = [head, "|" + "---|" * (9 + len(corpora))]
    for r in [*([results["original"]] if results.get("original") else []), ref, *results["runs"]]:
        dppl = 100 * (sum(r["ppl"].values()) / sum(ref["ppl"].values()) - 1) if corpora else 0.0
        ppl = " | ".join(f"{r['ppl'][c]:.2f}" for c in corpora)
        lines.append(f"| {r['label']} | {r['expert_bytes'] / 1e6:.3f} | {r['vs_fp16']:.2f}x | "
                     f"{r['vs_original_fp16']:.2f}x | {r['avg_bits']:g} | "
                     f"{r['effective_bits']:g} | {ppl} | {dppl:+.1f}% | {r['mean_app_acc']:.4f} | "
                     f"{100 * (r['mean_app_acc'] - ref['mean_app_acc']):+.1f} |")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = results["float"]
    corpus = next(iter(ref["ppl"]), None)
    panels = ([("ppl", f"perplexity ({corpus})")] if corpus else []) + [("acc", "mean app accuracy")]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (kind, title) in zip(axes[0], panels, strict=True):
        def y(r: dict[str, Any], kind: str = kind) -> float:
            return float(r["ppl"][corpus]) if kind == "ppl" else float(r["mean_app_acc"])

        families = (("uniform", "s-"), ("ilp", "o-"), ("greedy", "^--"), ("gptq-uniform", "s:"), ("gptq-ilp", "o:"),
                    ("gptq-greedy", "^:"))
        for family, style in families:
            rows = [r for r in results["runs"] if r["label"].rsplit("-", 1)[0] == family]
            rows.sort(key=lambda r: r["expert_bytes"])
            if rows:
                ax.plot([r["expert_bytes"] / 1e6 for r in rows], [y(r) for r in rows], style, label=family)
                for r in rows:
                    ax.annotate(f"{r['avg_bits']:g}b", (r["expert_bytes"] / 1e6, y(r)), fontsize=7,
                                textcoords="offset points", xytext=(3, 3))
        ax.axhline(y(ref), color="k", ls="--", lw=1, label=f"fp16 experts ({ref['expert_bytes'] / 1e6:.2f} MB)")
        ax.set_xlabel("routed-expert bytes (MB)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = reference_parser(__doc__, "bench/results/quantize")
    p.add_argument("--pre", default="", help="compression pipeline to run before quantizing (e.g. prune/merge)")
    p.add_argument("--calib", default=None, help="quantize's calib option (default: news train + every app's train)")
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="also run the greedy baseline")
    p.add_argument("--metric", default="mse", choices=("mse", "relative"), help="quantize's sensitivity metric")
    p.add_argument("--only", default="", help="comma-separated run labels to keep (e.g. ilp-3,uniform-3), "
                   "without the algorithm prefix")
    p.add_argument("--algos", default="rtn", help="comma-separated rounding algorithms: rtn, gptq")
    p.add_argument("--all-experts", action="store_true", help="gptq: calibrate-all-experts=true")
    p.add_argument("--apps", default="all")
    p.add_argument("--ppl", type=lambda s: [x for x in s.split(",") if x], default=["wiki", "news"])
    p.add_argument("--app-examples", type=int, default=200)
    p.add_argument("--ppl-tokens", type=int, default=8192)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.calib is None:
        args.calib = ";".join([str(args.data / "lm" / "news" / "train.jsonl"), *(f"app:{a}" for a in APPS)])
    results = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "table.md").write_text(table(results) + "\n")
    plot(results, args.out / "quality_vs_bytes.png")
    print(table(results))


if __name__ == "__main__":
    main()
