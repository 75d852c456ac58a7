"""The README's main job: the whole pipeline on the embedded default model, ending on a device artifact.

With the shipped reference MoE: evaluate it (perplexity and a small held-out sample of every app), build
LiteMoE proxies for two apps (importance and loss sensitivity on the app's own data, prune + ILP match +
aligned merge to half the routed experts), evaluate each proxy on its app, save/reload one proxy and
check it is bit-identical and traces to one node per MoE layer. Then LiteMoE's customisation for an app
the reference never trained on (`health-source`): extract its proxy, tune LoRA on the proxy, plug the
adapter into the foundation and compare. Last, the deployable artifact (`moeopt.demo_deploy`): the
foundation compressed with a global calibration set, its experts quantized to mixed bits under a byte
budget, lowered for arm64, checked against PyTorch, run on a prompt and evaluated in ONNX Runtime, with
one table of source against artifact. Without the reference checkpoint: the same spine on a seeded
small MoE.

Everything is written under the output folder (`out/demo` by default), which the demo owns: a rerun
replaces what an earlier run wrote there and refuses a folder moeopt did not write.

The shipped data sample (`DEMO_DATA`) is `moeopt.data.prepare.make_fixtures(PREPARED, DEMO_DATA,
n_train=48, n_valid=0, n_test=100, n_docs=2, doc_chars=4000, n_train_held_out=3200,
held_out=["health-source"])`.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch

ASSETS = Path(__file__).parent / "assets"
REFERENCE = ASSETS / "reference-moe"
DEMO_DATA = ASSETS / "demo-data"
# Proxies built in the demo: two of the five apps, the two with the fewest labels (the loss sensitivity
# scores every label of every row once per expert). The deployable artifact at the end is evaluated on
# all five, and bench/compression.py covers every app.
PROXY_APPS = ("movie-sentiment", "tweet-sentiment")


def has_reference() -> bool:
    return (REFERENCE / "config.json").exists() and (REFERENCE / "model.safetensors").exists()


def seeded_checkpoint(path: Path, seed: int = 0) -> Path:
    """A small Mixtral-architecture MoE from a fixed seed, saved as a Hugging Face checkpoint."""
    from transformers import MixtralConfig, MixtralForCausalLM

    if (path / "config.json").exists():
        return path
    torch.manual_seed(seed)
    cfg = MixtralConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=256,
    )
    model = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 0.5)  # a router with preferences, not uniform
    model.save_pretrained(path)
    return path


def _check_roundtrip(model: Any, out: Path, ids: torch.Tensor) -> dict[str, object]:
    import moeopt

    # float32 on disk: merged experts are not representable in the source's float16, and this check is exact.
    saved = model.save(out, dtype=torch.float32, overwrite=True)  # the demo's own folder from an earlier run
    again = moeopt.load(saved)
    nodes = len(moeopt.moe_nodes(moeopt.trace(again, ids[:1])))
    return {
        "saved": str(saved), "reload_max_abs_diff": float((model.logits(ids) - again.logits(ids)).abs().max()),
        "moe_nodes_in_trace": nodes, "moe_layers": len(again.layers),
    }


def run_demo(out: Path) -> dict[str, object]:
    """Runs the demo, prints a short report, and returns it; exits non-zero if a check fails."""
    torch.manual_seed(0)
    result = _reference_demo(out) if has_reference() else _seeded_demo(out)
    ok = result["reload_max_abs_diff"] == 0.0 and result["moe_nodes_in_trace"] == result["moe_layers"]
    print("  status: " + ("OK" if ok else "MISMATCH"))
    if not ok:
        raise SystemExit(1)
    return result


def _reference_demo(out: Path) -> dict[str, object]:
    import moeopt
    from moeopt.data.apps import APPS
    from moeopt.demo_deploy import deploy
    from moeopt.eval import evaluate
    from moeopt.passes import PassContext, PassManager
    from moeopt.passes.calib import load_tokenizer
    from moeopt.tune.extract import proxy_pipeline

    t0 = time.perf_counter()
    base = moeopt.load(REFERENCE)
    tok = load_tokenizer(base)
    print(f"== reference model: {REFERENCE}")
    print(base.summary())
    ev: dict[str, Any] = {"data_root": DEMO_DATA, "ppl": [], "app_examples": 100, "progress": False}
    full_ev = {**ev, "ppl": ["wiki", "news"]}  # the deploy table compares the artifact with these figures
    full = evaluate(base.hf, tok, tasks=list(APPS), **full_ev)
    full_bytes = base.stats(float_bytes=2).expert_bytes
    rows = []
    proxy = None
    for app in PROXY_APPS:
        model = copy.deepcopy(base)
        # Without refit here: it would add ~20 s per app to the demo; the held-out app below shows it.
        pm = PassManager(proxy_pipeline(f"app:{app}", 0.5, refit=False), verify_each=True,
                         ctx=PassContext(data_root=DEMO_DATA))
        pm.run(model)
        res = evaluate(model.hf, tok, tasks=[app], **ev)
        rows.append((app, full["apps"][app]["accuracy"], res["apps"][app]["accuracy"],
                     full["apps"][app]["majority_acc"], model.stats(float_bytes=2).expert_bytes))
        proxy = proxy or model
    print(f"== LiteMoE proxies: {proxy_pipeline('app:APP', 0.5, refit=False)}")
    print(f"  {'app':<18} {'full acc':>8} {'proxy acc':>9} {'majority':>8} {'experts fp16 MiB':>17}")
    for app, a_full, a_proxy, maj, nbytes in rows:
        print(f"  {app:<18} {a_full:8.3f} {a_proxy:9.3f} {maj:8.3f} {nbytes / 2**20:8.2f} of {full_bytes / 2**20:.2f}")
    mean_full = sum(r[1] for r in rows) / len(rows)
    mean_proxy = sum(r[2] for r in rows) / len(rows)
    print(f"  mean accuracy: full {mean_full:.3f}, proxies {mean_proxy:.3f} "
          f"({100 * mean_proxy / max(mean_full, 1e-9):.1f}% kept) on {DEMO_DATA.name} (100 test examples per app)")
    ids = torch.randint(0, int(base.config.vocab_size), (2, 32), generator=torch.Generator().manual_seed(0))
    assert proxy is not None
    check = _check_roundtrip(proxy, out / f"proxy-{PROXY_APPS[0]}", ids)
    held = _held_out_app(base, tok, out, ev)
    result: dict[str, object] = {"model": str(REFERENCE), "mean_acc_full": mean_full, "mean_acc_proxy": mean_proxy,
                                 **held, **check}
    _print_report(result)
    deployed = deploy(base, tok, out / "artifact", DEMO_DATA, full, full_ev, list(APPS))  # ends on the table
    return {**result, **_deploy_summary(deployed), "seconds": round(time.perf_counter() - t0, 1)}


def _held_out_app(base: Any, tok: Any, out: Path, ev: dict[str, Any], app: str = "health-source",
                  steps: int = 400) -> dict[str, object]:
    """LiteMoE's workflow for an app new to the foundation: proxy (keep 0.3), LoRA on it, plugged back.

    400 LoRA steps, not bench/apps.py's 1000: under the load of shared cores this stage was most of the
    demo's time (568 s of 794 s with 1000 steps at load ~4; 69 s with 400 at load ~2), and it still lifts
    the foundation (0.100 -> 0.190 with 400 steps, 0.280 with 1000, majority 0.110, on 100 test examples).
    """
    from moeopt.eval import evaluate
    from moeopt.tune import TuneSettings, build_examples, extract, finetune, plug, read_rows
    from moeopt.tune.meta import peak_rss_mib, reset_peak_rss

    t0 = time.perf_counter()
    proxy = copy.deepcopy(base)
    # Ranked by routing frequency: the loss sensitivity on a 16-label app took minutes of the demo on 2
    # cores; refit still fits the proxy to the foundation's layer outputs, which the adapter's transfer needs.
    extract(proxy, f"app:{app}", keep=0.3, data_root=DEMO_DATA, rank="freq")
    rows, _ = read_rows(f"app:{app}", data_root=DEMO_DATA)
    examples = build_examples(rows, tok, vocab_size=int(base.config.vocab_size))
    reset_peak_rss()
    tuned = finetune(proxy, examples, TuneSettings(steps=steps, save_every=0), out / f"{app}-adapter",
                     progress=False, meta={"app": f"app:{app}"}, overwrite=True)
    del proxy, tuned
    plugged = plug(copy.deepcopy(base), out / f"{app}-adapter")
    before = evaluate(base.hf, tok, tasks=[app], **ev)["apps"][app]
    after = evaluate(plugged.hf, tok, tasks=[app], **ev)["apps"][app]
    print(f"== a new app, {app} (held out: the reference model never trained on it)")
    print(f"  proxy (keep 0.3, ranked by routing frequency, refitted) -> LoRA on the proxy ({steps} steps x 8 "
          f"of {len(examples)} train examples) "
          f"-> plugged into the foundation; peak RSS {peak_rss_mib():.0f} MiB")
    print(f"  accuracy: foundation {before['accuracy']:.3f}, foundation + proxy-tuned adapter "
          f"{after['accuracy']:.3f} (majority {before['majority_acc']:.3f}; {before['n']} test examples; "
          f"{time.perf_counter() - t0:.0f}s)")
    return {"held_out_app": app, "held_out_acc_foundation": before["accuracy"],
            "held_out_acc_litemoe": after["accuracy"]}


def _deploy_summary(d: dict[str, Any]) -> dict[str, object]:
    """The deploy stage's figures as flat report entries."""
    return {"artifact": d["artifact"], "artifact_bytes": d["artifact_bytes"], "source_bytes": d["source_bytes"],
            "artifact_mean_acc": d["artifact_acc"], "artifact_decode_tok_s": d["artifact_tok_s"],
            "parity_max_abs_diff": d["parity"]["max_abs_diff"], "parity_tolerance": d["parity"]["tolerance"]}


def _print_report(result: dict[str, object]) -> None:
    print("== report")
    for k, v in result.items():
        print(f"  {k:<24} {round(v, 4) if isinstance(v, float) else v}")


def _seeded_demo(out: Path) -> dict[str, object]:
    import moeopt
    from moeopt.passes import PassManager

    t0 = time.perf_counter()
    src = seeded_checkpoint(out / "seeded-moe")
    model = moeopt.load(src)
    print(f"== model (no reference checkpoint shipped): {src}")
    print(model.summary())
    report = PassManager("canonicalize,verify", verify_each=True, timing=True).run(model, source=str(src))
    print(report.timing_table())
    ids = torch.randint(0, int(model.config.vocab_size), (2, 32), generator=torch.Generator().manual_seed(0))
    result: dict[str, object] = {"model": str(src), **_check_roundtrip(model, out / "converted", ids),
                                 "seconds": round(time.perf_counter() - t0, 1)}
    _print_report(result)
    return result
