"""LiteMoE's per-app table on the reference model: for every app, the foundation without adapters, the
app's proxy without and with tuning, the foundation with the proxy-tuned adapter (LiteMoE), and the
foundation with an adapter tuned on the full model (upper bound); plus the peak memory and time of
tuning on the proxy vs on the full model, each tuning in its own `moeopt finetune` process so that its
RSS peak is its own. Writes results.json, table.md and apps.png.

The five foundation apps are in the reference model's training mixture, so an adapter has little left to
learn there; the held-out apps (`moeopt.data.HELD_OUT_APPS`) are new to it, which is LiteMoE's setting.
Gains are summarised for both groups apart.

    .venv/bin/python bench/apps.py --out bench/results/apps
    .venv/bin/python bench/apps.py --quick --apps intent        # a smoke run in a minute or two
    .venv/bin/python bench/apps.py --merge DIR1,DIR2 --out DIR  # one table from runs of other apps
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import reference_parser  # bench/common.py (the script's folder is on sys.path)

import moeopt
from moeopt.data.apps import ALL_APPS, APP_SPLITS, APPS, get_app
from moeopt.eval import evaluate
from moeopt.passes.calib import app_rows, load_tokenizer
from moeopt.tune import extract, plug, read_meta

CONFIGS = {  # key -> label in the table and the plot
    "foundation": "foundation",
    "proxy": "proxy",
    "proxy_tuned": "proxy + adapter",
    "litemoe": "foundation + proxy adapter (LiteMoE)",
    "upper": "foundation + full adapter (upper bound)",
}
LITEMOE_GAIN = 12.7  # LiteMoE (SenSys 2024): accuracy points over the foundation without adapters


def tune(model_dir: Path, app: str, out: Path, args: argparse.Namespace, seed: int = 0) -> dict[str, Any]:
    """Run `moeopt finetune` in a fresh process; returns its adapter metadata plus the process wall time."""
    cmd = [sys.executable, "-m", "moeopt.cli", "finetune", str(model_dir), "--app", app_data(app, args), "-o", str(out),
           "--data", str(args.data), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--seed", str(seed),
           "--lr", str(args.lr), "--rank", str(args.rank), "--alpha", str(2 * args.rank), "--targets", args.targets,
           "--loss", args.loss, "--threads", str(args.threads), "--save-every", "0", "--no-progress",
           "--overwrite"]  # bench/tune_memory.py tunes into the same cached folders on every run
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"finetune failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    meta = read_meta(out)
    train = meta["train"]
    peak = max(train["peak_rss_mib"], meta["load_peak_rss_mib"])  # the process's peak after its imports
    return {"peak_rss_mib": peak, "rss_before_mib": train["rss_before_mib"],
            "above_base_mib": round(peak - train["rss_before_mib"], 1),
            "tuning_rss_mib": round(train["peak_rss_mib"] - train["rss_before_mib"], 1),
            "load_rss_mib": round(meta["load_peak_rss_mib"] - train["rss_before_mib"], 1),
            "train_seconds": train["seconds"], "process_seconds": round(time.perf_counter() - t0, 1),
            "loss_first": train["loss_first"], "loss_last": train["loss_last"],
            "trainable_params": train["trainable_params"], "model_params": meta["tuned_on"]["params"],
            "expert_params": meta["tuned_on"]["expert_params"], "log": proc.stdout.strip().splitlines()}


def app_data(app: str, args: argparse.Namespace) -> str:
    """The app's rows that the proxy is extracted from and both adapters are tuned on."""
    return f"app:{app}" if args.app_split == "train" else f"app:{app}:{args.app_split}"


def accuracy(model: moeopt.MoEModel, tok: Any, app: str, args: argparse.Namespace) -> dict[str, float]:
    res = evaluate(model.hf, tok, data_root=args.data, ppl=[], tasks=[app], app_examples=args.app_examples or None,
                   progress=False)["apps"][app]
    return {k: float(res[k]) for k in ("accuracy", "macro_f1", "gold_nll", "majority_acc", "n")}


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    apps = list(ALL_APPS) if args.apps == "all" else args.apps.split(",")
    base = moeopt.load(args.model)
    tok = load_tokenizer(base)
    # The foundation as a float32 moeopt checkpoint: both tunings then load through the same reader.
    foundation_dir = base.save(work / "foundation", dtype=torch.float32)
    settings = {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "rank", "targets", "loss", "keep",
                                              "calib_tokens", "app_examples", "threads", "refit", "seeds", "app_split")}
    results: dict[str, Any] = {"model": str(args.model), "data": str(args.data), "apps": apps, "settings": settings,
                               "rows": {}, "litemoe_reference_gain": LITEMOE_GAIN}
    for app in apps:
        t0 = time.perf_counter()
        row: dict[str, Any] = {"acc": {}}
        row["acc"]["foundation"] = accuracy(base, tok, app, args)
        proxy = copy.deepcopy(base)
        report = extract(proxy, app_data(app, args), keep=args.keep, calib_tokens=args.calib_tokens,
                         data_root=args.data, refit=args.refit)
        proxy_dir = proxy.save(work / f"proxy-{app}", dtype=torch.float32)
        row["pipeline"] = report.pipeline
        row["expert_share"] = proxy.stats().expert / base.stats().expert
        row["acc"]["proxy"] = accuracy(proxy, tok, app, args)
        del proxy
        per_seed: dict[str, list[dict[str, float]]] = {"proxy_tuned": [], "litemoe": [], "upper": []}
        for seed in args.seeds:  # LoRA init and data order: one tuning of each kind per seed
            tp = tune(proxy_dir, app, work / f"adapter-proxy-{app}-{seed}", args, seed)
            tf = tune(foundation_dir, app, work / f"adapter-full-{app}-{seed}", args, seed)
            if seed == args.seeds[0]:
                row["tune_proxy"], row["tune_full"] = tp, tf  # memory and time: the first seed's processes
            plugged = {"proxy_tuned": (proxy_dir, "proxy"), "litemoe": (foundation_dir, "proxy"),
                       "upper": (foundation_dir, "full")}  # model + the adapter tuned on which
            for key, (model_dir, tuned_on) in plugged.items():
                adapter = work / f"adapter-{tuned_on}-{app}-{seed}"
                per_seed[key].append(accuracy(plug(model_dir, adapter), tok, app, args))
        for key, accs in per_seed.items():  # the mean over seeds; each seed's accuracy beside it
            row["acc"][key] = {k: sum(a[k] for a in accs) / len(accs) for k in accs[0]}
        row["accuracy_per_seed"] = {key: [a["accuracy"] for a in accs] for key, accs in per_seed.items()}
        row["seconds"] = round(time.perf_counter() - t0, 1)
        results["rows"][app] = row
        a, tp, tf = row["acc"], row["tune_proxy"], row["tune_full"]
        print(f"{app:<18} " + " ".join(f"{k}={a[k]['accuracy']:.3f}" for k in CONFIGS)
              + f" | tuning RSS {tp['above_base_mib']:.0f} vs {tf['above_base_mib']:.0f} MiB above base, "
              f"{tp['train_seconds']:.0f}s vs {tf['train_seconds']:.0f}s ({row['seconds']:.0f}s)", flush=True)
    results["summary"] = summarise(results)
    return results


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    rows = results["rows"]
    n = max(len(rows), 1)
    mean = {k: sum(r["acc"][k]["accuracy"] for r in rows.values()) / n for k in CONFIGS}
    gains = {a: r["acc"]["litemoe"]["accuracy"] - r["acc"]["foundation"]["accuracy"] for a, r in rows.items()}
    gaps = {a: r["acc"]["upper"]["accuracy"] - r["acc"]["litemoe"]["accuracy"] for a, r in rows.items()}
    groups = {"foundation_apps": [a for a in rows if a in APPS], "held_out_apps": [a for a in rows if a not in APPS]}

    def ratio(key: str) -> dict[str, float]:
        return {a: r["tune_proxy"][key] / max(r["tune_full"][key], 1e-9) for a, r in rows.items()}

    mem = {key: ratio(key) for key in ("peak_rss_mib", "above_base_mib", "tuning_rss_mib", "train_seconds")}
    return {
        "mean_accuracy": mean, "gain_points": {a: 100 * g for a, g in gains.items()},
        "mean_gain_points": 100 * sum(gains.values()) / n, "gap_to_upper_points": {a: 100 * g for a, g in gaps.items()},
        "mean_gap_to_upper_points": 100 * sum(gaps.values()) / n,
        "proxy_over_full": mem,  # per app: proxy tuning / full tuning
        "beats_foundation_on_every_app": all(g > 0 for g in gains.values()),
        "by_group": {  # apps the foundation trained on vs apps new to it
            name: {"apps": names, "mean_gain_points": 100 * sum(gains[a] for a in names) / len(names),
                   "beats_foundation_on_every_app": all(gains[a] > 0 for a in names),
                   "within_2_points_of_upper_bound": all(gaps[a] <= 0.02 + 1e-9 for a in names)}
            for name, names in groups.items() if names},
        # Accuracies are counts over the same rows: a gap of exactly 2 points must not fail on float rounding.
        "within_2_points_of_upper_bound": all(g <= 0.02 + 1e-9 for g in gaps.values()),
        "proxy_memory_at_most_a_third": {k: all(v <= 1 / 3 for v in mem[k].values())
                                         for k in ("peak_rss_mib", "above_base_mib", "tuning_rss_mib")},
    }


def table(results: dict[str, Any]) -> str:
    s, rows = results["summary"], results["rows"]
    head = ("| app | in foundation's training | majority | " + " | ".join(CONFIGS.values())
            + " | LiteMoE gain | gap to upper |")
    lines = [head, "|" + "---|" * (len(CONFIGS) + 5)]
    for app, r in rows.items():
        accs = " | ".join(f"{r['acc'][k]['accuracy']:.3f}" for k in CONFIGS)
        lines.append(f"| {app} | {'yes' if app in APPS else '**no** (held out)'} | "
                     f"{r['acc']['foundation']['majority_acc']:.3f} | {accs} | "
                     f"{s['gain_points'][app]:+.1f} | {s['gap_to_upper_points'][app]:+.1f} |")
    lines.append("| **mean** | | | " + " | ".join(f"**{s['mean_accuracy'][k]:.3f}**" for k in CONFIGS)
                 + f" | **{s['mean_gain_points']:+.1f}** | **{s['mean_gap_to_upper_points']:+.1f}** |")
    st = results["settings"]
    lines += ["", f"Gain and gap in accuracy points; LiteMoE reports +{LITEMOE_GAIN} over its foundation. "
              f"Proxies: keep {st['keep']}, {'with' if st.get('refit') else 'without'} refit. Tuned rows (proxy + "
              f"adapter, LiteMoE, upper bound): mean over LoRA seeds {st.get('seeds', [0])}, {st['steps']} steps "
              f"each, on the app's {st.get('app_split', 'train')} rows; each seed's accuracy is in results.json."]
    for name, g in s.get("by_group", {}).items():
        lines.append(f"- {name.replace('_', ' ')} ({', '.join(g['apps'])}): mean gain {g['mean_gain_points']:+.1f}; "
                     f"beats the foundation on every one: {'yes' if g['beats_foundation_on_every_app'] else 'no'}; "
                     f"within 2 points of the upper bound: {'yes' if g['within_2_points_of_upper_bound'] else 'no'}.")
    lines += ["",
              "Tuning memory, proxy vs full model, each in its own process (MiB; ratio = proxy / full): the "
              "process's peak RSS after its imports; that peak above the RSS before loading the model (model, "
              "data, activations, optimizer); the same while tuning only.", "",
              "| app | params proxy / full | peak RSS | ratio | above base | ratio | tuning only | ratio | "
              "seconds | ratio |", "|---|---|---|---|---|---|---|---|---|---|"]
    for app, r in rows.items():
        p, f, q = r["tune_proxy"], r["tune_full"], s["proxy_over_full"]
        cells = [f"{p['model_params'] / 1e6:.1f}M / {f['model_params'] / 1e6:.1f}M"]
        for key in ("peak_rss_mib", "above_base_mib", "tuning_rss_mib", "train_seconds"):
            cells += [f"{p[key]:.0f} / {f[key]:.0f}", f"{q[key][app]:.2f}"]
        lines.append(f"| {app} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = results["rows"]
    apps = list(rows)
    fig, (ax, mx) = plt.subplots(1, 2, figsize=(14, 4.6), gridspec_kw={"width_ratios": [2.2, 1]})
    x = np.arange(len(apps))
    width = 0.8 / len(CONFIGS)
    for i, (key, label) in enumerate(CONFIGS.items()):
        ax.bar(x + (i - (len(CONFIGS) - 1) / 2) * width, [rows[a]["acc"][key]["accuracy"] for a in apps], width,
               label=label)
    ax.scatter(x, [rows[a]["acc"]["foundation"]["majority_acc"] for a in apps], marker="_", s=400, c="k",
               label="majority label", zorder=3)
    ax.set_xticks(x, apps, rotation=15)
    ax.set_ylabel("app accuracy")
    ax.set_title(f"per-app accuracy (keep={results['settings']['keep']}, {results['settings']['steps']} steps)")
    ax.set_ylim(0, 1.2)  # room for the legend above the bars
    ax.legend(fontsize=7, loc="upper center", ncol=3)
    ax.grid(axis="y", alpha=0.3)
    for j, (kind, key) in enumerate((("proxy", "tune_proxy"), ("full model", "tune_full"))):
        above = [rows[a][key]["above_base_mib"] for a in apps]
        base = [rows[a][key]["rss_before_mib"] for a in apps]
        pos = x + (j - 0.5) * 0.4
        mx.bar(pos, base, 0.4, color="0.8", label="process before loading" if j == 0 else None)
        mx.bar(pos, above, 0.4, bottom=base, label=f"tuning on the {kind}")
    mx.set_xticks(x, apps, rotation=15)
    mx.set_ylabel("peak RSS (MiB)")
    mx.set_title("peak memory of LoRA tuning")
    mx.legend(fontsize=7)
    mx.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def read_runs(dirs: list[Path]) -> list[dict[str, Any]]:
    """The results.json of each result folder (ValueError naming the first folder without one)."""
    missing = [d for d in dirs if not (d / "results.json").is_file()]
    if missing:
        raise ValueError(f"no results.json in {missing[0]}")
    runs = [json.loads((d / "results.json").read_text()) for d in dirs]
    for r in runs:  # runs from before --app-split tuned on the train split
        r["settings"].setdefault("app_split", "train")
    return runs


def merge_runs(dirs: list[Path]) -> dict[str, Any]:
    """One result from runs of the same settings over different apps (e.g. one process per app)."""
    runs = read_runs(dirs)
    first = runs[0]
    for d, r in zip(dirs, runs, strict=True):
        if r["settings"] != first["settings"] or r["model"] != first["model"]:
            raise ValueError(f"{d}: other settings or model than {dirs[0]}; only runs of one setting merge")
    merged = {**first, "apps": [a for r in runs for a in r["apps"]],
              "rows": {k: v for r in runs for k, v in r["rows"].items()}}
    merged["summary"] = summarise(merged)
    merged["seconds"] = round(sum(r["seconds"] for r in runs), 1)
    merged["runs"] = f"{len(runs)} runs of the same settings, merged: " + ", ".join(
        f"--apps {','.join(r['apps'])}" for r in runs)
    return merged


def pool_seeds(dirs: list[Path]) -> dict[str, Any]:
    """Runs of one setting over different LoRA seeds, pooled per app: each tuned row's mean over every
    seed, and LiteMoE's gap to the upper bound paired by seed (mean, standard error, 95% t-interval)."""
    from scipy import stats  # only this mode needs it

    runs = read_runs(dirs)
    key = [{k: v for k, v in r["settings"].items() if k != "seeds"} for r in runs]
    if any(k != key[0] or r["model"] != runs[0]["model"] for k, r in zip(key, runs, strict=True)):
        raise ValueError("only runs whose settings differ in --seeds alone pool")
    seeds = [s for r in runs for s in r["settings"]["seeds"]]
    if len(set(seeds)) < len(seeds):
        raise ValueError(f"a seed occurs in two runs: {seeds}")
    apps = [a for a in runs[0]["apps"] if all(a in r["rows"] for r in runs)]
    out: dict[str, Any] = {"model": runs[0]["model"], "settings": key[0], "seeds": seeds,
                           "runs": [str(d) for d in dirs], "apps": {}}
    for app in apps:
        per = {k: [x for r in runs for x in r["rows"][app]["accuracy_per_seed"][k]]
               for k in runs[0]["rows"][app]["accuracy_per_seed"]}
        gap = [100 * (u - m) for u, m in zip(per["upper"], per["litemoe"], strict=True)]
        n = len(gap)
        mean = sum(gap) / n
        se = float(stats.sem(gap)) if n > 1 else float("nan")
        half = float(stats.t.ppf(0.975, n - 1)) * se if n > 1 else float("nan")
        out["apps"][app] = {"accuracy_per_seed": per, "mean": {k: sum(v) / n for k, v in per.items()},
                            "gap_to_upper_points": {"per_seed": [round(g, 1) for g in gap], "mean": mean,
                                                    "standard_error": se, "ci95": [mean - half, mean + half]}}
    return out


def pool_table(pooled: dict[str, Any]) -> str:
    """Markdown: pooled means and the paired gap per app."""
    lines = [f"LoRA seeds {pooled['seeds']} pooled; gap = upper bound - LiteMoE in accuracy points, paired by seed.",
             "", "| app | seeds | proxy + adapter | LiteMoE | upper bound | gap (mean +- s.e.) | 95% interval |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for app, r in pooled["apps"].items():
        m, g = r["mean"], r["gap_to_upper_points"]
        lines.append(f"| {app} | {len(g['per_seed'])} | {m['proxy_tuned']:.3f} | {m['litemoe']:.3f} | "
                     f"{m['upper']:.3f} | {g['mean']:+.1f} +- {g['standard_error']:.1f} | "
                     f"[{g['ci95'][0]:+.1f}, {g['ci95'][1]:+.1f}] |")
    return "\n".join(lines)


def main() -> None:
    p = reference_parser(__doc__, "bench/results/apps")
    p.add_argument("--apps", default="all", help="'all' (foundation and held-out apps) or comma-separated names")
    p.add_argument("--keep", type=float, default=0.3, help="share of routed experts kept as hot slots in a proxy")
    p.add_argument("--steps", type=int, default=150, help="LoRA steps of each tuning")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="attention")
    p.add_argument("--loss", default="label", choices=("label", "all"))
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--app-examples", type=int, default=0, help="test examples per app (0 = all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--refit", action=argparse.BooleanOptionalAction, default=True,
                   help="refit the proxy's kept experts to the foundation's layer outputs (moeopt extract's default)")
    p.add_argument("--seeds", default="0", help="LoRA seeds, comma-separated; tuned accuracies are their mean")
    p.add_argument("--app-split", default="train", choices=APP_SPLITS,
                   help="the app's rows to extract the proxy from and tune on; 'extra': rows the reference model "
                        "never trained on (foundation apps with more rows than their train cap)")
    combine = p.add_mutually_exclusive_group()
    combine.add_argument("--merge", default="", help="comma-separated result folders to merge into --out (no run)")
    combine.add_argument("--pool-seeds", default="",
                   help="comma-separated result folders of one setting and different --seeds: pooled per app into "
                        "--out/seeds.json and seeds.md (no run)")
    p.add_argument("--quick", action="store_true", help="smoke run: 20 steps, 60 test examples, 4096 calib tokens")
    args = p.parse_args()
    if args.quick:
        args.steps, args.app_examples, args.calib_tokens = 20, 60, 4096
    try:
        args.seeds = [int(x) for x in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds takes comma-separated integers, got '{args.seeds}'")
    for name in [] if args.apps == "all" else args.apps.split(","):
        try:
            get_app(name)
        except moeopt.BadInputError as e:
            p.error(str(e))
    if args.pool_seeds:
        try:
            pooled = pool_seeds([Path(d) for d in args.pool_seeds.split(",")])
        except ValueError as e:
            p.error(f"--pool-seeds: {e}")
        text = pool_table(pooled)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "seeds.json").write_text(json.dumps(pooled, indent=1))
        (args.out / "seeds.md").write_text(text + "\n")
        print(text)
        return
    t0 = time.perf_counter()
    if args.merge:
        try:
            results = merge_runs([Path(d) for d in args.merge.split(",")])
        except ValueError as e:
            p.error(f"--merge: {e}")
    else:
        for name in ALL_APPS if args.apps == "all" else args.apps.split(","):
            try:  # every app's --app-split is in the data root, before any work
                app_rows(name, args.app_split, args.data)
            except moeopt.BadInputError as e:
                p.error(str(e))
        with tempfile.TemporaryDirectory(prefix="moeopt-bench-apps-") as tmp:
            results = run(args, Path(tmp))
        results["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "table.md").write_text(table(results) + "\n")
    plot(results, args.out / "apps.png")
    print(table(results))
    print(f"total {results['seconds']:.0f}s; wrote {args.out}")


if __name__ == "__main__":
    main()
