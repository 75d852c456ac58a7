"""Peak memory of LoRA tuning on a LiteMoE proxy vs on the full model, for a model whose parameters are
mostly experts: the random ~1B Mixtral shape of `bench/runtime.py` (8 experts, 94% of the parameters
routed), beside the reference model (71%). Memory depends on the tensor shapes, not on their values, so
random weights measure it as a trained model would; accuracy is not measured here (`bench/apps.py` does).

Each `moeopt finetune` runs in its own process (the same command as `bench/apps.py`), a few steps, with
the proxy extracted by `moeopt extract --rank freq --no-refit` on a short calibration sample (the ~1B
model's forward is slow on 2 cores; neither the ranking nor the refit changes the proxy's shapes).
Writes tune_memory.json.

    .venv/bin/python bench/tune_memory.py                    # both models (~1B: builds its checkpoint once)
    .venv/bin/python bench/tune_memory.py --models reference
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from apps import tune  # bench/apps.py: one `moeopt finetune` process, its metadata and peak RSS
from runtime import DEFAULT_CACHE, checkpoint

from moeopt.data.apps import default_data_root, get_app
from moeopt.errors import BadInputError


def proxy(ckpt: Path, out: Path, args: argparse.Namespace) -> Path:
    """`moeopt extract` in its own process (cached: the ~1B model's proxy takes minutes)."""
    if (out / "config.json").exists():
        return out
    cmd = [sys.executable, "-m", "moeopt.cli", "extract", str(ckpt), "--app", f"app:{args.app}", "--keep",
           str(args.keep), "--rank", "freq", "--no-refit", "--calib-tokens", str(args.calib_tokens), "--data",
           str(args.data), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"extract failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return out


def measure(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    ckpt = checkpoint(name, args.cache)
    px = proxy(ckpt, args.cache / name / f"proxy-{args.app}-keep{args.keep}", args)
    row: dict[str, Any] = {"checkpoint": str(ckpt), "proxy": str(px)}
    for kind, model in (("proxy", px), ("full", ckpt)):
        t = tune(model, args.app, work / f"{name}-{kind}", args)
        row[kind] = {k: v for k, v in t.items() if k != "log"}
    p, f = row["proxy"], row["full"]
    row["expert_share_of_params"] = f["expert_params"] / f["model_params"]
    row["params_ratio"] = p["model_params"] / f["model_params"]
    row["ratio"] = {k: p[k] / f[k] for k in ("peak_rss_mib", "above_base_mib", "tuning_rss_mib")}
    row["at_most_a_third"] = {k: v <= 1 / 3 for k, v in row["ratio"].items()}
    print(f"{name}: params {p['model_params'] / 1e6:.0f}M / {f['model_params'] / 1e6:.0f}M "
          f"(experts {100 * row['expert_share_of_params']:.0f}% of the full model); peak RSS "
          f"{p['peak_rss_mib']:.0f} / {f['peak_rss_mib']:.0f} MiB ({row['ratio']['peak_rss_mib']:.2f}); above the "
          f"process before loading {p['above_base_mib']:.0f} / {f['above_base_mib']:.0f} MiB "
          f"({row['ratio']['above_base_mib']:.2f})", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--models", default="reference,1b", help="comma-separated: reference, 1b")
    ap.add_argument("--app", default="intent", help="app whose data extracts the proxy and tunes both")
    ap.add_argument("--keep", type=float, default=0.3)
    ap.add_argument("--steps", type=int, default=3, help="LoRA steps (the peak comes in the first)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank")
    ap.add_argument("--targets", default="attention")
    ap.add_argument("--loss", default="label", choices=("label", "all"))
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", type=Path, default=default_data_root())
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--out", type=Path, default=Path("bench/results/tune_memory.json"))
    args = ap.parse_args()
    models = [m for m in args.models.split(",") if m]
    bad = sorted(set(models) - {"reference", "1b"})
    if bad or not models:
        ap.error(f"--models: unknown model {bad[0]!r} (reference, 1b)" if bad else "--models: name at least one")
    try:
        get_app(args.app)
    except BadInputError as e:
        ap.error(str(e))
    work = args.cache / "tune-memory"
    t0 = time.perf_counter()
    settings = {k: getattr(args, k) for k in ("app", "keep", "steps", "batch_size", "lr", "rank", "targets",
                                              "calib_tokens", "threads")}
    result = {"settings": settings, "models": {m: measure(m, args, work) for m in models}}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"total {result['seconds']:.0f}s; wrote {args.out}")


if __name__ == "__main__":
    main()
