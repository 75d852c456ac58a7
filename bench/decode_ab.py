"""Paired decode A/B of artifacts in ONE process: their sessions alternate generations (order reversed
every round), so a change of machine load touches all of them alike; per-step decode times give a p10
that approximates the quiet figure on a shared machine. Prints JSON (load average before and after).

    .venv/bin/python bench/decode_ab.py ART_A,ART_B[,...] [--rounds 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from moeopt.runtime import Session


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", help="comma-separated artifact folders")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=32)
    args = ap.parse_args()
    arts = [a for a in args.artifacts.split(",") if a]
    sessions = [Session(a, verify=False, threads=args.threads) for a in arts]
    vocab = int(sessions[0].manifest["vocab_size"])
    ids = np.random.default_rng(0).integers(1, vocab, (1, args.prompt), dtype=np.int64)
    for s in sessions:  # warm-up: first runs allocate
        s.generate(ids, 8, stop_tokens=())
    steps: list[list[float]] = [[] for _ in arts]
    decode: list[list[float]] = [[] for _ in arts]
    load0 = os.getloadavg()[0]
    for r in range(args.rounds):
        for i in range(len(arts)) if r % 2 == 0 else reversed(range(len(arts))):
            stamps = [time.perf_counter()]
            g = sessions[i].generate(ids, args.new, stop_tokens=(),
                                     on_token=lambda _k, _t, s=stamps: s.append(time.perf_counter()))
            steps[i] += list(np.diff(stamps[1:]) * 1e3)  # decode steps only (the first token is the prefill's)
            decode[i].append(g.decode_tokens_per_s)
    out = {"load_average": [round(load0, 2), round(os.getloadavg()[0], 2)], "threads": args.threads,
           "rounds": args.rounds, "artifacts": {}}
    for i, a in enumerate(arts):
        st = np.array(steps[i])
        out["artifacts"][Path(a).name] = {
            "step_ms_p10": round(float(np.percentile(st, 10)), 3), "step_ms_p50": round(float(np.median(st)), 3),
            "best_decode_tok_s": round(max(decode[i]), 1), "median_decode_tok_s": round(float(np.median(decode[i])), 1)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
