"""LiteMoE's routing predictor on the reference model: top-k recall per layer, its size as a share of the
model, and how well importance estimated from the first router + predictor ranks experts (Spearman
against the importance measured by running the whole model), per app.

    .venv/bin/python bench/predictor.py --out bench/results/predictor.json
"""

from __future__ import annotations

import copy
import json
import time

import torch
from common import reference_parser  # bench/common.py (the script's folder is on sys.path)
from scipy.stats import spearmanr

import moeopt
from moeopt.data.apps import APPS
from moeopt.passes import PassContext, PassManager


def main() -> None:
    p = reference_parser(__doc__, "bench/results/predictor.json")
    p.add_argument("--tokens", type=int, default=16384, help="calibration tokens per app")
    p.add_argument("--steps", type=int, default=400)
    a = p.parse_args()
    torch.set_num_threads(2)
    base = moeopt.load(a.model)
    ctx = PassContext(data_root=a.data)
    t0 = time.perf_counter()
    train = ";".join(f"app:{x}" for x in APPS)
    report = PassManager(f"predictor{{calib={train},max-tokens={a.tokens},steps={a.steps}}}", ctx=ctx).run(base)
    stats = report.stats[0][1]
    print(json.dumps(stats, indent=1))
    per_app = {}
    for app in APPS:
        true_ctx, est_ctx = PassContext(data_root=a.data), PassContext(data_root=a.data)
        spec = f"calib=app:{app}:valid,max-tokens={a.tokens},progress=false"  # held out from the predictor
        PassManager(f"importance{{{spec}}}", ctx=true_ctx).run(copy.deepcopy(base))
        PassManager(f"importance{{{spec},estimator=predictor}}", ctx=est_ctx).run(base)
        true, est = true_ctx.analyses.peek("importance"), est_ctx.analyses.peek("importance")
        rho = [float(spearmanr(true.layers[i].freq, est.layers[i].freq).statistic) for i in range(len(base.layers))]
        per_app[app] = {"spearman_per_layer": rho, "spearman_mean_later_layers": sum(rho[1:]) / max(len(rho) - 1, 1)}
        print(app, [round(r, 3) for r in rho])
    result = {
        "model": str(a.model), "predictor": stats, "importance_spearman": per_app,
        "mean_spearman_later_layers": sum(v["spearman_mean_later_layers"] for v in per_app.values()) / len(per_app),
        "note": "predictor trained on the apps' train splits; importance compared on their valid splits",
        "seconds": round(time.perf_counter() - t0, 1),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    print(f"mean Spearman (layers 2..L): {result['mean_spearman_later_layers']:.3f}")


if __name__ == "__main__":
    main()
