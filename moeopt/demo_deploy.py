"""The demo's last stage: from the foundation model to a verified arm64 artifact, and one table.

The foundation is compressed once for every app (LiteMoE's pipeline on a global calibration set: the
five apps' train rows mixed with plain news text, so that both the apps and perplexity are served),
its experts quantized to mixed 2/4 bits under a byte budget by the quantize pass's ILP, and the result
lowered for the arm64 profile. The artifact is then checked against the PyTorch reference it recorded
(`parity.npz`), run on a prompt, and evaluated by ONNX Runtime itself (`moeopt.runtime.lm`), so the
table's artifact column is what ships, not the IR in PyTorch.

2 and 4 bits only: 3-bit codes are widened to 4 in the artifact (moeopt.lower.onnx_quant), so they
would count as 3 bits in the budget but take 4 on disk; 8-bit QMoE quantizes activations, which would
raise the parity tolerance above 1e-3 (to 3x the simulated int8 error, `moeopt.lower.tolerance`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

KEEP = 0.5  # share of each layer's routed experts kept (the rest merged or removed)
BUDGET = "1.75MB"  # routed-expert bytes after quantization: between all-2-bit (~1.25 MB) and all-4-bit (~2.25 MB)
BITS = "2;4"
REFIT_STEPS = 100
TARGET = "arm64"
PROMPT = "The government said on Monday that"
NEW_TOKENS = 32


def calib_specs(data_root: Path, apps: list[str]) -> list[str]:
    """The global calibration set: every app's train split, plus plain news text when the data has it."""
    specs = [f"app:{a}" for a in apps]
    news = data_root / "lm" / "news" / "train.jsonl"
    if news.is_file():
        specs.append(str(news.resolve()))
    return specs


def deploy_pipeline(calib: list[str], out: Path, *, keep: float = KEEP, budget: str = BUDGET,
                    target: str = TARGET, refit: bool = True) -> str:
    """Compress (LiteMoE: loss-ranked prune, ILP match, aligned merge, refit), quantize, lower."""
    from moeopt.passes.pipeline import option_text
    from moeopt.tune.extract import proxy_pipeline

    spec = ";".join(calib)
    # Ranked by routing frequency (LiteMoE's ranking), not by loss sensitivity: the sensitivity analysis
    # scores every label of every row once per expert, 33 x 6 datasets here, which alone took longer than
    # the rest of the demo on 2 cores; refit then fits the kept experts to the foundation's layer outputs.
    compress = proxy_pipeline(spec, keep, calib_tokens=8192, rank="freq", refit=refit)
    if refit:  # a sixth of refit's default work (300 steps of 1024 tokens a layer): minutes less on 2 cores
        compress = compress.removesuffix(",refit") + f",refit{{steps={REFIT_STEPS},batch=512}}"
    quant = f"quantize{{budget={budget},candidates={BITS},calib={option_text(spec)},calib-tokens=4096}}"
    # overwrite: a rerun replaces the artifact an earlier run wrote (only a folder moeopt wrote; see moeopt.outdir)
    return f"{compress},{quant},lower{{out={option_text(str(out))},target={target},overwrite=true}}"


def folder_bytes(path: Path) -> int:
    """Bytes of every file under `path` (what a device has to store)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def parity(sess: Any, artifact: Path) -> dict[str, Any]:
    """ONNX Runtime's greedy decode of parity.npz's prompt against the PyTorch logits recorded there."""
    ref = np.load(artifact / str(sess.manifest.get("parity") or "parity.npz"))
    steps = int(ref["tokens"].shape[1])
    g = sess.generate(ref["prompt"], steps, stop_tokens=(), keep_logits=True)
    logits = np.stack(g.step_logits, axis=1)  # (1, steps, V)
    tokens = g.sequences[:, ref["prompt"].shape[1]:]
    return {"max_abs_diff": float(np.abs(logits - ref["logits"]).max()),
            "tolerance": float(sess.manifest.get("parity_tolerance", 1e-3)),
            "tokens_identical": bool((tokens == ref["tokens"]).all())}


def torch_decode_tok_s(hf: Any, vocab: int, *, prompt_len: int = 16, new: int = NEW_TOKENS,
                       repeats: int = 3) -> float:
    """Greedy decode tokens/s of a transformers model with its KV cache (the first token is the prefill's),
    the best of `repeats` runs: the cores are shared, and the best run is the least disturbed."""
    ids = torch.from_numpy(np.random.default_rng(0).integers(1, vocab, (1, prompt_len), dtype=np.int64))
    best = 0.0
    with torch.inference_mode():
        for _ in range(repeats):
            out = hf(input_ids=ids, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            t = time.perf_counter()
            for _ in range(new - 1):
                out = hf(input_ids=tok, past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            best = max(best, (new - 1) / (time.perf_counter() - t))
    return best


def ort_decode_tok_s(sess: Any, vocab: int, *, prompt_len: int = 16, new: int = NEW_TOKENS, repeats: int = 3) -> float:
    """The same measurement on the artifact (Session.generate's decode rate), best of `repeats`."""
    ids = np.random.default_rng(0).integers(1, vocab, (1, prompt_len), dtype=np.int64)
    return max(float(sess.generate(ids, new, stop_tokens=()).decode_tokens_per_s) for _ in range(repeats))


def run_prompt(sess: Any, tok: Any, prompt: str = PROMPT, new: int = NEW_TOKENS) -> str:
    """The artifact's greedy continuation of `prompt` (text)."""
    ids = np.array([tok.encode(prompt, add_special_tokens=False).ids], dtype=np.int64)
    g = sess.generate(ids, new)
    return str(tok.decode([int(t) for t in g.sequences[0, ids.shape[1]:]]))


def deploy(base: Any, tok: Any, out: Path, data_root: Path, source_eval: dict[str, Any], ev: dict[str, Any],
           apps: list[str]) -> dict[str, Any]:
    """Compress, quantize and lower `base` (left unchanged) to `out`; verify, run and evaluate the artifact.

    Args:
        source_eval: `moeopt.eval.evaluate` of the source on the same perplexity corpora and apps.
        ev: the evaluation settings the source was measured with (the artifact gets the same).

    Returns the table's figures; raises SystemExit(1) when the artifact fails its parity check.
    """
    import copy

    from moeopt.eval import evaluate
    from moeopt.outdir import check_out_dir
    from moeopt.passes import PassContext, PassManager
    from moeopt.runtime.lm import load_for_eval

    t0 = time.perf_counter()
    threads = max(1, min(4, os.cpu_count() or 1))  # the arm64 profile's 4, or fewer cores here
    check_out_dir(out, overwrite=True)  # a folder that is not moeopt's is refused before minutes of work
    calib = calib_specs(data_root, apps)
    text = deploy_pipeline(calib, out)
    print(f"== deployable artifact: {text.replace(';'.join(calib), 'CALIB')}")
    news = " and news text" if len(calib) > len(apps) else ""
    print(f"  CALIB (global): the train rows of {', '.join(apps)}{news}")
    model = copy.deepcopy(base)
    report = PassManager(text, verify_each=True, timing=True, ctx=PassContext(data_root=data_root)).run(model)
    print("  passes: " + ", ".join(f"{n} {s:.0f}s" for n, s in report.seconds))
    bits = [s.bits for layer in model.layers for s in layer.table.slots]
    t_build = time.perf_counter() - t0
    lm, tokenizer = load_for_eval(out, threads=threads)
    sess = lm.session
    check = parity(sess, out)
    text_out = run_prompt(sess, tokenizer)
    print(f"  built in {t_build:.0f}s; {out} on '{PROMPT}':")
    print(f"  {PROMPT}{text_out}")
    vocab = int(base.config.vocab_size)
    art_eval = evaluate(lm, tokenizer, tasks=apps, **ev)
    result = {
        "artifact": str(out), "pipeline": text, "target": sess.manifest.get("target", {}).get("target"),
        "source_bytes": folder_bytes(Path(base.source_dir)) if base.source_dir else 0,
        "artifact_bytes": folder_bytes(out),
        "source_expert_bytes": base.stats(float_bytes=2).expert_bytes,
        "artifact_expert_bytes": sum(layer.table.expert_bytes() for layer in model.layers),
        "bits": {str(b): bits.count(b) for b in sorted(set(bits), key=lambda b: b or 99)},
        "source_ppl": {c: r["ppl"] for c, r in source_eval["perplexity"].items()},
        "artifact_ppl": {c: r["ppl"] for c, r in art_eval["perplexity"].items()},
        "source_acc": source_eval["summary"]["mean_accuracy"], "artifact_acc": art_eval["summary"]["mean_accuracy"],
        "source_tok_s": torch_decode_tok_s(base.hf, vocab), "artifact_tok_s": ort_decode_tok_s(sess, vocab),
        "threads": threads, "parity": check, "seconds": round(time.perf_counter() - t0, 1),
    }
    print_table(result, n_apps=len(apps), examples=ev.get("app_examples"))
    if check["max_abs_diff"] > check["tolerance"] or not check["tokens_identical"]:
        print("  status: PARITY MISMATCH")
        raise SystemExit(1)
    return result


def print_table(r: dict[str, Any], *, n_apps: int, examples: int | None) -> None:
    """The demo's one table: source (PyTorch) against artifact (ONNX Runtime)."""
    mb = 1e6
    bits = ", ".join(f"{n} x {'float' if b == 'None' else b + '-bit'}" for b, n in r["bits"].items())
    p = r["parity"]
    rows = [
        ("files on disk (MB)", f"{r['source_bytes'] / mb:.2f}", f"{r['artifact_bytes'] / mb:.2f}"),
        ("routed experts (MB)", f"{r['source_expert_bytes'] / mb:.2f} fp16", f"{r['artifact_expert_bytes'] / mb:.2f}"),
        *[(f"perplexity {c}", f"{r['source_ppl'][c]:.1f}", f"{r['artifact_ppl'][c]:.1f}") for c in r["source_ppl"]],
        (f"mean accuracy, {n_apps} apps", f"{r['source_acc']:.3f}", f"{r['artifact_acc']:.3f}"),
        (f"decode tok/s here ({r['threads']} thr, best of 3)", f"{r['source_tok_s']:.0f}",
         f"{r['artifact_tok_s']:.0f}"),
        ("parity max |logit diff|", "reference", f"{p['max_abs_diff']:.1e} (tol {p['tolerance']:g})"),
    ]
    print(f"== source vs artifact ({r['target']}; experts {bits}; "
          f"{examples or 'all'} test examples per app; {r['seconds']:.0f}s)")
    print(f"  {'':<36} {'source (PyTorch)':>18} {'artifact (ORT)':>22}")
    for name, a, b in rows:
        print(f"  {name:<36} {a:>18} {b:>22}")
    print(f"  greedy tokens on the parity prompt: {'identical' if p['tokens_identical'] else 'DIFFER'}")
