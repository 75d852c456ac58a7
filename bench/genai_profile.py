"""Where a decode step goes in ONNX Runtime GenAI's loop: ORT's profiler on any GenAI model folder (the
model builder's or moeopt's artifact), kernel time per op type, prefill and decode apart.

Both models run in the same loop (onnxruntime_genai: append_tokens, then generate_next_token), each in
its own process, so what differs is the graph. Per op type: the median over runs of its summed kernel
time in a run (a preempted kernel would dominate a mean on a loaded machine). GenAI opens the decoder with
its config's session options; `enable_profiling` is overlaid (ORT writes one JSON trace per session).

    .venv/bin/python bench/genai_profile.py FOLDER [FOLDER ...] --out bench/results/runtime-gptoss/profile.json

A folder may be listed more than once (A B A B: paired rounds on a machine whose load changes); the
repeats are kept as NAME#2, NAME#3.

With bench/runtime.py's gpt-oss models (built by `bench/runtime.py --models gptoss`):

    C=~/.cache/moeopt/bench/gptoss
    .venv/bin/python bench/genai_profile.py $C/genai-builder-int4 $C/artifact-4bit-all-int8act \\
        $C/artifact-4bit-all-int8act-export --out bench/results/runtime-gptoss/profile.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np


def _prompt(vocab: int, n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(1, vocab, (1, n), dtype=np.int64)  # as bench/runtime.py


def generate(folder: Path, work: Path, prompt_len: int, new: int, threads: int, generations: int) -> None:
    """One process: a warm-up generation, then `generations` profiled ones; ORT writes its trace into
    `work` when the session ends (at the latest when the process exits)."""
    import onnxruntime_genai as og

    sys.path.insert(0, str(Path(__file__).parent))
    from runtime import genai_max_length  # bench/runtime.py

    config = og.Config(str(folder))
    opts: dict[str, Any] = {"intra_op_num_threads": threads, "enable_profiling": str(work / "ort")}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": opts}}}))
    model = og.Model(config)
    vocab = int(json.loads((folder / "genai_config.json").read_text())["model"]["vocab_size"])
    ids = _prompt(vocab, prompt_len).astype(np.int32)
    for _ in range(generations + 1):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=genai_max_length(folder, prompt_len + new),
                                  min_length=prompt_len + new, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        for _ in range(new):
            gen.generate_next_token()
        del gen
    del model


def summarise(folder: Path, work: Path, generations: int) -> dict[str, Any]:
    """Per op type the median over the profiled runs of its kernel time per prefill and per decode step,
    from the trace `generate` left in `work`."""
    traces = sorted(work.glob("ort*.json"))
    if not traces:
        raise RuntimeError(f"no ORT profile written under {work}")
    events = json.loads(traces[-1].read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    # model_run events in order: each generation is 1 prefill run + `new - 1` decode runs (GenAI's first
    # generate_next_token only picks the prefill's token) - the last runs are the profiled generations.
    per_gen = len(runs) // (generations + 1)
    prefill: dict[str, list[float]] = defaultdict(list)
    decode: dict[str, list[float]] = defaultdict(list)
    run_ms: dict[str, list[float]] = {"prefill": [], "decode": []}
    kernel_ms: dict[str, list[float]] = {"prefill": [], "decode": []}
    for gi in range(1, generations + 1):
        gen_runs = runs[gi * per_gen:(gi + 1) * per_gen]
        for ri, run in enumerate(gen_runs):
            lo, hi = run["ts"], run["ts"] + run["dur"]
            by_op: dict[str, float] = defaultdict(float)
            for e in nodes:
                if lo <= e["ts"] <= hi:
                    by_op[e["args"].get("op_name", "?")] += e["dur"] / 1000.0
            phase = "prefill" if ri == 0 else "decode"
            run_ms[phase].append(run["dur"] / 1000.0)
            kernel_ms[phase].append(sum(by_op.values()))
            target = prefill if ri == 0 else decode
            for op_name, ms in by_op.items():
                target[op_name].append(ms)
    n_dec = max(1, len(run_ms["decode"]))
    n_pre = max(1, len(run_ms["prefill"]))
    out: dict[str, Any] = {"folder": str(folder), "runs_per_generation": per_gen, "profiled_generations": generations}
    for phase, table, n in (("prefill", prefill, n_pre), ("decode", decode, n_dec)):
        # medians over runs: on a loaded machine a preempted kernel would dominate a mean
        med = {k: float(np.median(v + [0.0] * (n - len(v)))) for k, v in table.items()}
        ranked = sorted(med.items(), key=lambda kv: -kv[1])
        total = sum(med.values()) or 1.0
        out[phase] = {
            "runs": n,
            "ort_run_ms_median": float(np.median(run_ms[phase])),
            "kernel_ms_median": float(np.median(kernel_ms[phase])),
            "ops_ms_median": {k: round(v, 4) for k, v in ranked},
            "ops_share": {k: round(v / total, 4) for k, v in ranked},
        }
    import onnx

    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    counts: dict[str, int] = defaultdict(int)
    for node in graph.node:
        counts[node.op_type] += 1
    out["graph_nodes"] = len(graph.node)
    out["graph_ops"] = dict(sorted(counts.items(), key=lambda kv: -kv[1]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--generations", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        generate(args.folders[0], args.work, args.prompt, args.new, args.threads, args.generations)
        return
    import os

    result: dict[str, Any] = {"settings": {"prompt_tokens": args.prompt, "new_tokens": args.new,
                                           "threads": args.threads, "generations": args.generations},
                              "load_average_at_start": [round(v, 2) for v in os.getloadavg()], "models": {}}
    for folder in args.folders:
        cmd = [sys.executable, __file__, str(folder), "--out", str(args.out), "--prompt", str(args.prompt),
               "--new", str(args.new), "--threads", str(args.threads), "--generations", str(args.generations),
               "--child"]
        work = Path(tempfile.mkdtemp(prefix="genai-profile-"))
        res = subprocess.run([*cmd, "--work", str(work)], capture_output=True, text=True)
        name = folder.name  # a folder listed again (paired rounds: A B A B) gets #2, #3 ...
        n = 2
        while name in result["models"]:
            name, n = f"{folder.name}#{n}", n + 1
        if res.returncode != 0:
            result["models"][name] = {"error": (res.stderr.strip().splitlines() or ["?"])[-1]}
        else:
            result["models"][name] = summarise(folder, work, args.generations)
        shutil.rmtree(work, ignore_errors=True)
        row = result["models"][name]
        if "decode" in row:
            top = list(row["decode"]["ops_ms_median"].items())[:6]
            print(f"{name:36s} decode run {row['decode']['ort_run_ms_median']:.2f} ms (kernels "
                  f"{row['decode']['kernel_ms_median']:.2f}); {top}", flush=True)
        else:
            print(f"{name:36s} {row}", flush=True)
    result["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
