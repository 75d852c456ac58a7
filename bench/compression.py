"""Compression quality vs memory on the reference model: LiteMoE (prune + ILP match + aligned merge)
against the baselines, at several kept-expert fractions, with a global calibration set and with each
app's own data (the LiteMoE proxy setting). Writes JSON, a markdown table and PNG plots.

    .venv/bin/python bench/compression.py --out bench/results/compression
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
from moeopt.passes import PassManager
from moeopt.passes.calib import load_tokenizer
from moeopt.tune.extract import proxy_pipeline

METHODS = ("litemoe", "litemoe-refit", "litemoe-freq", "merge-noalign", "loss-prune", "frequency", "random",
           "magnitude")


def pipeline(method: str, keep: float, calib: str, calib_tokens: int) -> str:
    """Pipeline text of one method at one kept fraction of routed experts.

    litemoe is the proxy pipeline `moeopt extract` runs (experts ranked and merge-weighted by the loss
    sensitivity) without its final refit; litemoe-refit the same with it (`moeopt extract`'s default);
    litemoe-freq the same with LiteMoE's frequency ranking; merge-noalign the litemoe
    pipeline without neuron alignment; loss-prune the same ranking with plain pruning (nothing merged).
    """
    if method in ("litemoe", "litemoe-refit", "litemoe-freq", "merge-noalign"):
        rank = "freq" if method == "litemoe-freq" else "loss"
        align = "none" if method == "merge-noalign" else "assignment"
        return proxy_pipeline(calib, keep, calib_tokens=calib_tokens, rank=rank, align=align,
                              refit=method == "litemoe-refit")
    if method == "loss-prune":
        return f"sensitivity{{calib={calib},progress=false}},prune{{keep={keep},score=loss}}"
    imp = f"importance{{calib={calib},max-tokens={calib_tokens},progress=false}}"
    return {
        "frequency": f"{imp},prune{{method=frequency,keep={keep}}}",
        "random": f"prune{{method=random,keep={keep}}}",
        "magnitude": f"prune{{method=magnitude,keep={keep}}}",
    }[method]


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    base = moeopt.load(args.model)
    tok = load_tokenizer(base)
    apps = list(APPS) if args.apps == "all" else args.apps.split(",")
    ev = dict(data_root=args.data, app_examples=args.app_examples, ppl_tokens=args.ppl_tokens, progress=False)
    t0 = time.perf_counter()
    reference = evaluate(base.hf, tok, ppl=args.ppl, tasks=apps, **ev)
    results: dict[str, Any] = {
        "model": str(args.model), "apps": apps, "settings": args.settings, "eval": ev | {"data_root": str(args.data)},
        "uncompressed": {"apps": _accs(reference, apps), "ppl": _ppls(reference),
                         "expert_params": base.stats().expert},
        "runs": [],
    }
    print(f"uncompressed: mean app acc {_mean(_accs(reference, apps)):.4f}  ({time.perf_counter() - t0:.0f}s)")
    for setting in args.settings:
        for keep in args.fractions:
            for method in args.methods:
                row = _one(base, tok, setting, method, keep, apps, args, ev)
                results["runs"].append(row)
                print(f"{setting:<8} keep={keep:<5} {method:<14} mean acc {row['mean_app_acc']:.4f} "
                      f"experts {row['expert_share']:.3f} ({row['seconds']:.0f}s)", flush=True)
    return results


def _one(base: moeopt.MoEModel, tok: Any, setting: str, method: str, keep: float, apps: list[str],
         args: argparse.Namespace, ev: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    accs: dict[str, float] = {}
    ppl: dict[str, float] = {}
    shares = []
    if setting == "global":
        calib = ";".join(f"app:{a}" for a in apps)
        model = copy.deepcopy(base)
        text = pipeline(method, keep, calib, args.calib_tokens)
        PassManager(text, verify_each=True).run(model)
        res = evaluate(model.hf, tok, ppl=args.ppl, tasks=apps, **ev)
        accs, ppl = _accs(res, apps), _ppls(res)
        shares.append(model.stats().expert / base.stats().expert)
    else:  # per-app: each app compresses with its own data and is judged on its own task (LiteMoE's proxy)
        for app in apps:
            model = copy.deepcopy(base)
            text = pipeline(method, keep, f"app:{app}", args.calib_tokens)
            PassManager(text, verify_each=True).run(model)
            res = evaluate(model.hf, tok, ppl=[], tasks=[app], **ev)
            accs[app] = _accs(res, [app])[app]
            shares.append(model.stats().expert / base.stats().expert)
    return {
        "setting": setting, "method": method, "keep": keep, "pipeline": text, "apps": accs, "ppl": ppl,
        "mean_app_acc": _mean(accs), "expert_share": sum(shares) / len(shares),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def combine(folders: list[Path]) -> dict[str, Any]:
    """One result from several runs' results.json: their runs in order, sorted by setting, keep and method.
    The runs must share the model, apps and evaluation settings (else their figures do not compare)."""
    missing = [str(f) for f in folders if not (f / "results.json").is_file()]
    if missing:
        raise SystemExit(f"--combine: no results.json in {', '.join(missing)}")
    parts = [json.loads((f / "results.json").read_text()) for f in folders]
    first = parts[0]
    for f, part in zip(folders[1:], parts[1:], strict=True):
        for key in ("model", "apps", "eval", "uncompressed"):
            if part[key] != first[key]:
                raise SystemExit(f"--combine: {f} differs from {folders[0]} in '{key}'; its figures do not compare")
    order = {m: i for i, m in enumerate(METHODS)}
    settings = list(dict.fromkeys(s for part in parts for s in part["settings"]))
    runs = sorted((r for part in parts for r in part["runs"]),
                  key=lambda r: (settings.index(r["setting"]), -r["keep"], order.get(r["method"], len(order))))
    return first | {"settings": settings, "runs": runs, "combined_from": [str(f) for f in folders]}


def _accs(res: dict[str, Any], apps: list[str]) -> dict[str, float]:
    return {a: float(res["apps"][a]["accuracy"]) for a in apps}


def _ppls(res: dict[str, Any]) -> dict[str, float]:
    return {k: float(v["ppl"]) for k, v in res.get("perplexity", {}).items()}


def _mean(d: dict[str, float]) -> float:
    return sum(d.values()) / max(len(d), 1)


def table(results: dict[str, Any]) -> str:
    """Markdown: one row per (setting, keep, method), mean accuracy and its share of the uncompressed."""
    ref = _mean(results["uncompressed"]["apps"])
    apps = results["apps"]
    head = "| setting | keep | method | mean acc | vs full | " + " | ".join(apps) + " |"
    lines = [head, "|" + "---|" * (5 + len(apps)), f"| - | 1.0 | uncompressed | {ref:.4f} | 100.0% | "
             + " | ".join(f"{results['uncompressed']['apps'][a]:.3f}" for a in apps) + " |"]
    for r in results["runs"]:
        per_app = " | ".join(f"{r['apps'][a]:.3f}" for a in apps)
        lines.append(f"| {r['setting']} | {r['keep']} | {r['method']} | {r['mean_app_acc']:.4f} | "
                     f"{100 * r['mean_app_acc'] / ref:.1f}% | {per_app} |")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({r["setting"] for r in results["runs"]})
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4.2), squeeze=False)
    ref = _mean(results["uncompressed"]["apps"])
    for ax, setting in zip(axes[0], settings, strict=True):
        for method in METHODS:
            rows = sorted((r for r in results["runs"] if r["setting"] == setting and r["method"] == method),
                          key=lambda r: r["expert_share"])
            if rows:
                ax.plot([r["expert_share"] for r in rows], [r["mean_app_acc"] for r in rows], "o-", label=method)
        ax.axhline(ref, color="k", ls="--", lw=1, label="uncompressed")
        ax.set_xlabel("routed-expert parameters kept (share)")
        ax.set_ylabel("mean app accuracy")
        ax.set_title(f"calibration: {setting}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = reference_parser(__doc__, "bench/results/compression")
    p.add_argument("--fractions", type=lambda s: [float(x) for x in s.split(",")], default=[0.75, 0.5, 0.25])
    p.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    p.add_argument("--settings", type=lambda s: s.split(","), default=["per-app", "global"])
    p.add_argument("--apps", default="all")
    p.add_argument("--ppl", type=lambda s: [x for x in s.split(",") if x], default=["wiki", "news"])
    p.add_argument("--app-examples", type=lambda s: int(s) or None, default=None,
                   help="test rows per app (default: all; 0 = all)")
    p.add_argument("--ppl-tokens", type=int, default=16384)
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--combine", type=lambda s: [Path(x) for x in s.split(",")], default=None,
                   help="merge the results.json of these earlier runs (e.g. one per fraction) into --out; no run")
    args = p.parse_args()
    results = combine(args.combine) if args.combine else run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "table.md").write_text(table(results) + "\n")
    plot(results, args.out / "quality_vs_memory.png")
    print(table(results))


if __name__ == "__main__":
    main()
