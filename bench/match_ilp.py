"""Solve time of the `match` integer program at DeepSeek/Qwen scale: 64 experts x 32 layers.

    .venv/bin/python bench/match_ilp.py --out bench/results/match_ilp.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np

from moeopt.passes.match import solve_matching


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--keep", type=float, default=0.5, help="hot share; the rest split into moderate and cold")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("bench/results/match_ilp.json"))
    a = p.parse_args()
    hot = round(a.keep * a.experts)
    moderate = (a.experts - hot) // 2
    rng = np.random.default_rng(0)
    sims = [rng.uniform(-1, 1, size=(moderate, hot)) for _ in range(a.layers)]
    caps = [max(1, math.ceil(moderate / hot))] * a.layers
    seconds = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        _, objective, status = solve_matching(sims, caps)
        seconds.append(time.perf_counter() - t0)
    result = {
        "experts": a.experts, "layers": a.layers, "hot": hot, "moderate": moderate, "binary_variables":
        moderate * hot * a.layers, "status": status, "objective": objective, "seconds": seconds,
        "best_seconds": min(seconds), "machine": platform.processor() or platform.machine(),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
