"""`moeopt report routing`: how differently the apps route (the motivating figures of LiteMoE/SwapMoE).

Per layer: each app's expert-activation frequency (a heatmap, apps x experts), the Jensen-Shannon
divergence between every pair of apps, and the layers where two apps' top-2 experts are disjoint.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import torch

from moeopt.ir.model import MoEModel
from moeopt.passes.calib import load_app_calibration
from moeopt.passes.importance import collect


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen-Shannon divergence in bits (0 = same distribution, 1 = disjoint support)."""
    p, q = p.double() / p.sum(), q.double() / q.sum()
    m = (p + q) / 2

    def kl(a: torch.Tensor, b: torch.Tensor) -> float:
        mask = a > 0
        return float((a[mask] * (a[mask] / b[mask]).log2()).sum())

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def routing_report(
    model: MoEModel, apps: list[str], *, data_root: Path | None = None, split: str = "test",
    max_tokens: int = 16384, progress: bool = True,
) -> dict[str, Any]:
    """Per-app routing frequencies and divergences of every MoE layer."""
    sets = [load_app_calibration(model, a, split=split, max_tokens=max_tokens, data_root=data_root) for a in apps]
    imp = collect(model, sets, progress=progress)
    layers: list[dict[str, Any]] = []
    for i in range(len(model.layers)):
        freq = {a: imp.per_app[cs.name][i].freq for a, cs in zip(apps, sets, strict=True)}
        pairs: dict[str, float] = {}
        disjoint: list[list[Any]] = []
        for a, b in itertools.combinations(apps, 2):
            pairs[f"{a}|{b}"] = js_divergence(freq[a], freq[b])
            top_a = set(freq[a].topk(2).indices.tolist())
            top_b = set(freq[b].topk(2).indices.tolist())
            if not top_a & top_b:
                disjoint.append([a, b, sorted(top_a), sorted(top_b)])
        layers.append({
            "layer": i, "freq": {a: [round(float(x), 5) for x in f] for a, f in freq.items()},
            "js": pairs, "mean_js": sum(pairs.values()) / max(len(pairs), 1), "disjoint_top2": disjoint,
        })
    return {
        "apps": apps, "split": split, "tokens_per_app": {a: cs.tokens for a, cs in zip(apps, sets, strict=True)},
        "layers": layers,
        "mean_js": sum(layer["mean_js"] for layer in layers) / max(len(layers), 1),
        "layers_with_disjoint_top2": [layer["layer"] for layer in layers if layer["disjoint_top2"]],
    }


def plot_heatmaps(report: dict[str, Any], path: Path) -> None:
    """One heatmap per layer: apps (rows) x experts (columns), colour = activation frequency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, apps = report["layers"], report["apps"]
    cols = min(len(layers), 3)
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 0.5 * len(apps) * rows + 1.6 * rows), squeeze=False)
    for ax in axes.flat[len(layers):]:
        ax.axis("off")
    for ax, layer in zip(axes.flat, layers, strict=False):
        grid = torch.tensor([layer["freq"][a] for a in apps])
        im = ax.imshow(grid, cmap="viridis", aspect="auto", vmin=0)
        ax.set_title(f"layer {layer['layer']}  (mean JS {layer['mean_js']:.3f} bits)", fontsize=9)
        ax.set_yticks(range(len(apps)), apps, fontsize=7)
        ax.set_xticks(range(grid.shape[1]))
        ax.set_xlabel("expert", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle("expert activation frequency per app", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "routing.json").write_text(json.dumps(report, indent=1))
    plot_heatmaps(report, out / "routing_heatmaps.png")
    return [out / "routing.json", out / "routing_heatmaps.png"]
