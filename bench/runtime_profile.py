"""Where a decode step's time goes: ONNX Runtime's profiler on a 4-bit resident artifact, per op type,
prefill and decode steps apart, driven by moeopt's own loop (`Session.generate`); and decode / prefill
tok/s of the exported attention graph against the GroupQueryAttention one (`lower{attention=...}`) in
paired rounds, each measurement in its own process. Writes profile.json / speed.json (+ md by hand).

The model is a mid-size random Mixtral (4 layers, H=1024, I=2816, 8 experts top-2, GQA 16/4, ~300M
parameters; the ~1B one of bench/runtime.py does not fit beside other jobs on a shared machine), built
with the same code as bench/runtime.py's, quantized to 4 bits (group 64) and lowered at accuracy level 4.

    .venv/bin/python bench/runtime_profile.py build                 # checkpoint + both artifacts (cached)
    .venv/bin/python bench/runtime_profile.py profile --attention export
    .venv/bin/python bench/runtime_profile.py speed --rounds 4      # paired rounds, export vs gqa
    .venv/bin/python bench/runtime_profile.py build --accuracy-level 0 && \
        .venv/bin/python bench/runtime_profile.py tokens            # greedy tokens export vs gqa
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from runtime import DEFAULT_CACHE, REPO, random_mixtral  # bench/runtime.py (script folder on sys.path)

MID: dict[str, Any] = {
    "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 4, "num_attention_heads": 16,
    "num_key_value_heads": 4, "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 8192,
    "max_position_embeddings": 2048, "tie_word_embeddings": False,
}
PASSES = "quantize{method=uniform,bits=4,group=64}"
ACCURACY_LEVEL = 4
ATTENTION = ("export", "gqa")
GENERATIONS = 3  # profiled generations (after one warm-up)


def checkpoint(cache: Path) -> Path:
    """The random mid-size Mixtral, built once (seeded) as bench/runtime.py builds its ~1B one."""
    return random_mixtral(cache / "mixtral-mid", MID)


def artifact(cache: Path, attention: str, accuracy_level: int = ACCURACY_LEVEL) -> Path:
    act = "int8act" if accuracy_level == 4 else f"acc{accuracy_level}"
    return cache / "mixtral-mid" / f"artifact-4bit-{act}-{attention}"


def build(cache: Path, which: list[str], accuracy_level: int = ACCURACY_LEVEL) -> None:
    import torch

    import moeopt
    from moeopt.lower import lower
    from moeopt.passes import PassManager

    torch.set_num_threads(2)
    todo = [a for a in which if not (artifact(cache, a, accuracy_level) / "manifest.json").exists()]
    if not todo:
        return
    model = moeopt.load(checkpoint(cache))
    if getattr(model.config, "output_router_logits", False):
        model.config.output_router_logits = False
    PassManager(PASSES).run(model)
    from moeopt.lower.parity import measure_parity

    for att in todo:
        dest = artifact(cache, att, accuracy_level)
        t = time.perf_counter()
        # verify=False, then measured here: at int8 activations this random model's exported graph is
        # already past the 0.25 tolerance (0.286), so both graphs are kept and their parity reported.
        lower(model, dest, accuracy_level=accuracy_level, pipeline=PASSES, overwrite=True, attention=att, verify=False)
        seconds = time.perf_counter() - t
        parity = measure_parity(dest, model)
        m = json.loads((dest / "manifest.json").read_text())
        info = {"attention": att, "accuracy_level": accuracy_level, "lower_s": round(seconds, 1),
                "parity_measured": parity, "parity_tolerance": m["parity_tolerance"], "ops": m["graph"]["ops"]}
        (dest.parent / f"{dest.name}.info.json").write_text(json.dumps(info, indent=1))
        print(json.dumps(info), flush=True)


def _prompt(vocab: int, n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(1, vocab, (1, n), dtype=np.int64)


def _open(art: Path, threads: int, profile_prefix: Path | None = None) -> Any:
    """moeopt's Session on `art`; with a prefix, its ORT session re-opened with ORT's profiler on."""
    import onnxruntime as ort

    from moeopt.runtime import Session
    from moeopt.runtime.session import session_options

    sess = Session(art, verify=False, threads=threads)
    if profile_prefix is not None:
        so = session_options(sess.manifest.get("target", {}), threads)
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_prefix)
        sess.ort = ort.InferenceSession(str(art / sess.manifest["graph"]["file"]), so,
                                        providers=["CPUExecutionProvider"])
    return sess


def profile(art: Path, prompt_len: int, new: int, threads: int, out: Path) -> dict[str, Any]:
    """Kernel time per op type, prefill and decode apart, from ORT's profile of one generation (after a
    warm-up generation), beside the loop's wall time: what ORT's run adds and what Python adds."""
    out.mkdir(parents=True, exist_ok=True)
    sess = _open(art, threads, out / "ort")
    ids = _prompt(int(sess.manifest["vocab_size"]), prompt_len)
    sess.generate(ids, new, stop_tokens=())  # warm-up: the first runs allocate and prepack
    gens = [sess.generate(ids, new, stop_tokens=()) for _ in range(GENERATIONS)]
    trace = Path(sess.ort.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])[new:]  # the measured generations: prefill, then new - 1 decode steps each
    nodes = sorted((e for e in events if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")),
                   key=lambda e: e["ts"])
    starts = np.array([e["ts"] for e in nodes])
    phases: dict[str, dict[str, Any]] = {}
    for phase, sel in (("prefill", runs[::new]), ("decode", [r for i, r in enumerate(runs) if i % new])):
        # per run: kernel time per op type; then the median over runs (a shared machine preempts threads
        # mid-kernel now and then: one such kernel would dominate a mean)
        table: list[dict[str, float]] = []
        for r in sel:
            lo, hi = np.searchsorted(starts, r["ts"]), np.searchsorted(starts, r["ts"] + r["dur"], side="right")
            per: dict[str, float] = {}
            for e in nodes[lo:hi]:
                op_name = str(e.get("args", {}).get("op_name", "?"))
                per[op_name] = per.get(op_name, 0.0) + e["dur"] / 1e3
            table.append(per)
        names = sorted({k for per in table for k in per})
        med = {k: float(np.median([per.get(k, 0.0) for per in table])) for k in names}
        med = dict(sorted(med.items(), key=lambda kv: -kv[1]))
        kernels = sum(med.values())
        run_ms = float(np.median([r["dur"] / 1e3 for r in sel]))
        phases[phase] = {
            "runs": len(sel),
            "ort_run_ms_per_run": run_ms,
            "kernel_ms_per_run": kernels,
            "ort_overhead_ms_per_run": run_ms - kernels,  # ORT's executor between kernels (median run)
            "per_op_ms_per_run": med,
            "per_op_share_of_kernels": {k: v / kernels for k, v in med.items()},
        }
    g = min(gens, key=lambda x: x.decode_seconds)
    phases["prefill"]["wall_ms"] = g.prefill_seconds * 1e3
    phases["decode"]["wall_ms_per_step"] = g.decode_seconds / max(g.new_tokens - 1, 1) * 1e3
    phases["decode"]["outside_ort_ms_per_step"] = phases["decode"]["wall_ms_per_step"] - \
        phases["decode"]["ort_run_ms_per_run"]  # Python loop, feeds, copies of past/present
    graph = sess.manifest["graph"]
    return {"artifact": art.name, "attention": graph.get("attention") or "export", "ops": graph.get("ops"),
            "prompt_tokens": prompt_len, "new_tokens": new, "threads": threads,
            "load_average": [round(v, 2) for v in os.getloadavg()], **phases}


def measure(art: Path, prompt_len: int, new: int, repeats: int, threads: int) -> dict[str, Any]:
    """Best-of-`repeats` prefill and decode tok/s of moeopt's loop (bench/runtime.py's measure_artifact)."""
    sess = _open(art, threads)
    ids = _prompt(int(sess.manifest["vocab_size"]), prompt_len)
    best_p, best_d = 0.0, 0.0
    for r in range(repeats + 1):
        g = sess.generate(ids, new, stop_tokens=())
        if r:
            best_p, best_d = max(best_p, prompt_len / g.prefill_seconds), max(best_d, g.decode_tokens_per_s)
    return {"prefill_tok_s": best_p, "decode_tok_s": best_d}


def tokens(cache: Path, accuracy_level: int, prompt_len: int, new: int, threads: int) -> dict[str, Any]:
    """Greedy tokens of the export and the gqa artifact of one accuracy level, side by side."""
    out = {}
    for att in ATTENTION:
        sess = _open(artifact(cache, att, accuracy_level), threads)
        g = sess.generate(_prompt(int(sess.manifest["vocab_size"]), prompt_len), new, stop_tokens=(), keep_logits=True)
        out[att] = (g.sequences[0, prompt_len:], np.stack(g.step_logits))
    same = out["export"][0] == out["gqa"][0]
    return {"accuracy_level": accuracy_level, "new_tokens": new, "greedy_tokens_equal": bool(same.all()),
            "equal_prefix": int(same.size if same.all() else np.argmin(same)),
            "max_abs_logit_diff_step0": float(np.abs(out["export"][1][0] - out["gqa"][1][0]).max())}


def speed(args: argparse.Namespace, which: list[str]) -> dict[str, Any]:
    """Paired rounds: every configuration once per round, in its own process, order alternating."""
    rounds = []
    for r in range(args.rounds):
        row: dict[str, Any] = {"load_average_before": [round(v, 2) for v in os.getloadavg()]}
        for att in which if r % 2 == 0 else list(reversed(which)):
            cmd = [sys.executable, __file__, "measure", "--attention", att, "--cache", str(args.cache),
                   "--threads", str(args.threads), "--prompt", str(args.prompt), "--new", str(args.new),
                   "--repeats", str(args.repeats)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            row[att] = json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else \
                {"error": (res.stderr.strip().splitlines() or ["?"])[-1]}
        print(json.dumps(row), flush=True)
        rounds.append(row)
    summary: dict[str, Any] = {}
    for key in ("prefill_tok_s", "decode_tok_s"):
        for att in which:
            vals = [r[att][key] for r in rounds if key in r[att]]
            summary[f"{att}_{key}_median"] = float(np.median(vals)) if vals else None
        if len(which) == 2:
            ratios = [r[which[1]][key] / r[which[0]][key] for r in rounds if key in r[which[0]] and key in r[which[1]]]
            median = float(np.median(ratios)) if ratios else None
            summary[f"{key}_ratio_{which[1]}_over_{which[0]}"] = {"per_round": ratios, "median": median}
    return {"settings": {"prompt_tokens": args.prompt, "new_tokens": args.new, "repeats": args.repeats,
                         "threads": args.threads, "rounds": args.rounds, "batch": 1, "best_of_repeats": True},
            "rounds": rounds, "summary": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=("build", "profile", "measure", "speed", "tokens"))
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--attention", default="export,gqa")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--accuracy-level", type=int, default=ACCURACY_LEVEL, help="build: 4 (int8 activations) or 0")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "runtime-profile")
    args = ap.parse_args()
    which = [a for a in args.attention.split(",") if a]
    if args.cmd == "build":
        build(args.cache, which, args.accuracy_level)
    elif args.cmd == "measure":
        print(json.dumps(measure(artifact(args.cache, which[0]), args.prompt, args.new, args.repeats, args.threads)))
    elif args.cmd == "tokens":
        res = [tokens(args.cache, level, args.prompt, args.new, args.threads) for level in (ACCURACY_LEVEL, 0)]
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "tokens.json").write_text(json.dumps(res, indent=1))
        print(json.dumps(res))
    elif args.cmd == "profile":
        result = {a: profile(artifact(args.cache, a), args.prompt, args.new, args.threads, Path("/tmp") / "moeopt-prof")
                  for a in which}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile.json").write_text(json.dumps(result, indent=1))
        for a, r in result.items():
            dec = r["decode"]
            print(a, {k: round(v, 2) for k, v in dec["per_op_ms_per_run"].items()},
                  "wall/step", round(dec["wall_ms_per_step"], 2), "ort run", round(dec["ort_run_ms_per_run"], 2))
    else:
        result = speed(args, which)
        result["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "speed.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result["summary"]))


if __name__ == "__main__":
    sys.exit(main())
