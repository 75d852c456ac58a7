"""Paired comparison of offload serving configurations (`bench/offload.py`'s child runs).

On 2 shared cores one configuration's decode speed moves by tens of percent between runs, more than the
differences being looked for. Here every configuration runs once per round, one after another at each
budget, so a slow stretch of the machine hits them alike, and each prefetching configuration is scored
per round against that round's on-demand and reference-oracle runs: its share of the oracle's gain
``(tok/s - on-demand) / (oracle - on-demand)``. Writes sweep.json.

A configuration is ``METHOD`` or ``METHOD:key=value,...`` with keys ``predictor-depth``,
``predictor-width``, ``prefetch-policy``, ``oracle-depth``, ``oracle-causal``, ``io-threads``, ``expert-threads``,
``token-hints``, ``early-hints``; the
on-demand run and the reference oracle (every layer ahead, under ``--prefetch-policy``, LFU by default) are
always included.

    .venv/bin/python bench/offload_sweep.py --prefetch-top 4 --configs \
        "oracle:oracle-depth=1;oracle:oracle-depth=2;predictor:predictor-width=2" \
        --out bench/results/offload-sweep/oracle-depth
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import offload
from runtime import DEFAULT_CACHE

KEYS = {"predictor-depth": int, "predictor-width": int, "prefetch-policy": str, "oracle-depth": int,
        "oracle-causal": int, "io-threads": int, "expert-threads": int, "token-hints": int,
        "early-hints": int}
BASELINES = ("on-demand", "oracle")


def parse_config(text: str, base: argparse.Namespace) -> tuple[str, argparse.Namespace]:
    """``METHOD[:k=v,...]`` -> (method, the child's arguments); ValueError names what is wrong."""
    method, _, opts = text.partition(":")
    if method not in offload.METHODS:
        raise ValueError(f"unknown method '{method}' in '{text}' (one of {', '.join(offload.METHODS)})")
    argv = []
    for item in filter(None, opts.split(",")):
        key, _, value = item.partition("=")
        if key not in KEYS or not value:
            raise ValueError(f"bad option '{item}' in '{text}' (keys: {', '.join(KEYS)})")
        argv += [f"--{key}", value]
    args = copy.copy(base)
    try:  # offload.py's own parser checks each value (types, ranges, choices)
        parsed = _quiet(offload.make_parser()).parse_args(argv)
    except argparse.ArgumentError as e:
        raise ValueError(f"'{text}': {e}") from None
    for key in KEYS:
        dest = key.replace("-", "_")
        if f"--{key}" in argv:
            setattr(args, dest, getattr(parsed, dest))
    return method, args


def _quiet(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`ap`, raising ArgumentError instead of printing usage and exiting."""
    ap.exit_on_error = False
    return ap


def shares(tok_s: list[float], on_demand: list[float], oracle: list[float]) -> list[float | None]:
    """Per round, the share of the oracle's gain over on-demand (None where the oracle gained nothing)."""
    return [round((p - d) / (o - d), 3) if o > d else None for p, d, o in zip(tok_s, on_demand, oracle, strict=True)]


def by_layer(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over rounds of each MoE layer's misses and stall (ms), from the cache's per-layer counters."""
    layers = [r["counters"]["layers"] for r in runs if "layers" in r.get("counters", {})]
    if not layers:
        return {}
    med = statistics.median
    return {"median_by_layer": {i: {"misses": med(la[i]["misses"] for la in layers),
                                    "stall_ms": round(1000 * med(la[i]["stall_seconds"] for la in layers), 1)}
                                for i in layers[0]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", required=True, help="';'-separated configurations (see above)")
    ap.add_argument("--budgets", default="0.35,0.25,0.15", help="fractions of offloaded expert bytes")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prefetch-top", type=int, default=4, help="experts each hint output names (the artifact)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--far", type=int, default=0, help="the artifact's predictor far-head width (0: none)")
    ap.add_argument("--early", type=int, default=64, help="the artifact's predictor early-head width (0: none)")
    ap.add_argument("--new", type=int, default=128, help="generated tokens")
    ap.add_argument("--temperature", type=offload.TEMPERATURE, default=0.0,
                    help="0: greedy; else seeded sampling (offload.py's --temperature)")
    ap.add_argument("--top-p", type=offload.TOP_P, default=1.0, help="nucleus cut when sampling, in (0, 1]")
    ap.add_argument("--prefetch-policy", default="lfu", choices=offload.PREFETCH_POLICIES,
                    help="cache policy of the oracle baseline and of every configuration that names none")
    ap.add_argument("--storage-mbps", type=offload.NON_NEGATIVE, default=0.0,
                    help="emulated storage MB/s of every run (offload.py's --storage-mbps; 0: this machine's)")
    ap.add_argument("--storage-latency-ms", type=offload.NON_NEGATIVE, default=0.0,
                    help="per-read latency of the emulated storage")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--out", type=Path, required=True)
    cli = ap.parse_args()
    offload.check_storage(ap, cli)
    base = offload.make_parser().parse_args([  # offload.py's defaults for the rest
        "--cache", str(cli.cache), "--out", str(cli.out), "--threads", str(cli.threads), "--new", str(cli.new),
        "--prefetch-top", str(cli.prefetch_top), "--far", str(cli.far), "--early", str(cli.early),
        "--temperature", str(cli.temperature),
        "--top-p", str(cli.top_p), "--prefetch-policy", cli.prefetch_policy,
        "--storage-mbps", str(cli.storage_mbps), "--storage-latency-ms", str(cli.storage_latency_ms)])
    base.out = base.out / base.model  # as offload.py's main does
    configs = {"on-demand": ("on-demand", base), "oracle": ("oracle", base)}
    for text in filter(None, (c.strip() for c in cli.configs.split(";"))):
        try:
            configs[text] = parse_config(text, base)
        except ValueError as e:
            ap.error(str(e))
    budgets = [float(b) for b in cli.budgets.split(",")]
    offload.build(base)
    t0 = time.perf_counter()
    first = offload._spawn(base, "resident", 1.0)  # the reference tokens and the routing traces
    if "error" in first:
        sys.exit(f"offload_sweep: the resident run failed: {first['error']}")
    runs: list[dict[str, Any]] = []
    for rnd in range(cli.rounds):
        for frac in budgets:
            for name, (method, args) in configs.items():
                run = {**offload._spawn(args, method, frac, rnd), "config": name}
                runs.append(run)
                print(rnd, frac, name, run.get("decode_tok_s", run.get("error")), flush=True)
    summary: dict[str, Any] = {}
    for frac in budgets:
        mine = {name: [r for r in runs if r["config"] == name and r["budget_fraction"] == frac] for name in configs}
        tok = {name: [r.get("decode_tok_s", float("nan")) for r in rs] for name, rs in mine.items()}
        summary[str(frac)] = {name: {"median_tok_s": round(statistics.median(v), 1), "tok_s": v, **by_layer(mine[name]),
                                     **({} if name in BASELINES else
                                        {"paired_share": (s := shares(v, tok["on-demand"], tok["oracle"])),
                                         "median_paired_share": statistics.median(x for x in s if x is not None)
                                         if any(x is not None for x in s) else None})}
                              for name, v in tok.items()}
    result = {"settings": f"reference model, prompt 32, {cli.new} new tokens, {offload.decoding(base)}, "
                          f"{cli.threads} threads, {base.prefetch_policy} under predictor and oracle unless a "
                          f"configuration says otherwise, token hints {'on' if base.token_hints else 'off'}, "
                          f"prefetch-top {cli.prefetch_top}, far heads {cli.far or 'none'}, "
                          f"early head {cli.early or 'none'}, storage {offload.storage_text(base)}, "
                          f"{cli.rounds} rounds",
              "configs": list(configs), "summary": summary, "runs": runs,
              "seconds": round(time.perf_counter() - t0, 1)}
    cli.out.mkdir(parents=True, exist_ok=True)
    (cli.out / "sweep.json").write_text(json.dumps(result, indent=1))
    for frac, rows in summary.items():
        print(frac, {name: (row["median_tok_s"], row.get("median_paired_share")) for name, row in rows.items()})


if __name__ == "__main__":
    main()
