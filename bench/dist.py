"""Speed-up of distributed compilation (torchrun, gloo) over one process, on a random Mixtral.

Runs one `moeopt convert` pipeline that exercises every sharded path (importance over the calibration
shards, per-expert loss sensitivity, merge alignment, GPTQ Hessians, GPTQ sensitivity and packing by
expert) three ways, each a fresh process tree timed from outside:

- `1proc-1thread`: `python -m moeopt convert ...` with OMP_NUM_THREADS=1 (the rank's own setting);
- `1proc-2threads`: the same with OMP_NUM_THREADS=2 (what one process gets from 2 cores);
- `2ranks-1thread`: `torchrun --standalone --nproc-per-node 2 -m moeopt convert ...`, 1 thread per rank.

Each records the wall time (process start, imports, load and save included), the CPU seconds of the
process tree, rank 0's per-pass times (`--timing`), the load average before and after (the machine is
shared: compare runs taken at similar load only), and the sha256 of the written weights (header keys
sorted; the 2-rank file equals the 1-thread process's when float summation order moves no rounding).

    .venv/bin/python bench/dist.py                       # default shape, results in bench/results/dist/
    .venv/bin/python bench/dist.py --layers 2 --repeats 1 --label smoke
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.runtime import DEFAULT_CACHE, random_mixtral  # noqa: E402

OUT = REPO / "bench" / "results" / "dist" / "dist.json"
CONFIGS = ("1proc-1thread", "1proc-2threads", "2ranks-1thread")


def shape(args: argparse.Namespace) -> dict[str, Any]:
    return {"hidden_size": args.hidden, "intermediate_size": args.inter, "num_hidden_layers": args.layers,
            "num_attention_heads": 8, "num_key_value_heads": 4, "num_local_experts": args.experts,
            "num_experts_per_tok": 2, "vocab_size": 8192, "max_position_embeddings": 2048,
            "tie_word_embeddings": False}


def pipeline(calib: Path, args: argparse.Namespace) -> str:
    c = f"calib={calib},seq-len=128"
    return (f"importance{{{c},max-tokens={args.tokens},progress=false}},"
            f"sensitivity{{{c},max-tokens={args.sens_tokens},progress=false}},"
            "prune{keep=0.75,cold=0.125,score=loss},match,merge,"
            f"quantize{{algo=gptq,avg-bits=4,candidates=2;4;8,{c},calib-tokens={args.tokens},group=64}}")


def calibration(folder: Path, tokens: int) -> Path:
    """Seeded random token ids (the random model has no language to calibrate on)."""
    import torch

    path = folder / f"calib-{tokens}.jsonl"
    if not path.exists():
        gen = torch.Generator().manual_seed(0)
        rows = [json.dumps({"ids": torch.randint(0, 8192, (512,), generator=gen).tolist()})
                for _ in range(-(-tokens // 512))]
        path.write_text("\n".join(rows) + "\n")
    return path


def pass_times(stdout: str) -> dict[str, float]:
    """Rank 0's `--timing` table (`pass seconds share` rows, ending on `total`): pass -> seconds."""
    out: dict[str, float] = {}
    rows = stdout.splitlines()
    start = next((i for i, r in enumerate(rows) if r.split()[:2] == ["pass", "seconds"]), None)
    for r in rows[start + 1:] if start is not None else []:
        parts = r.split()
        out[parts[0]] = float(parts[1])
        if parts[0] == "total":
            break
    return out


def tensors_digest(path: Path) -> str:
    """sha256 of a safetensors file with its header's keys sorted (the writer orders `__metadata__` by a
    per-process hash, so two processes' saves of equal tensors differ in those bytes alone)."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True).encode() + data[8 + n :]).hexdigest()


def run(config: str, ckpt: Path, dest: Path, passes: str) -> dict[str, Any]:
    threads = "2" if config == "1proc-2threads" else "1"
    env = {**os.environ, "OMP_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
                if config.startswith("2ranks") else [sys.executable])
    cmd = [*launcher, "-m", "moeopt", "convert", str(ckpt), "-o", str(dest), "--passes", passes, "--timing"]
    shutil.rmtree(dest, ignore_errors=True)
    load0 = os.getloadavg()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{config} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    weights = tensors_digest(dest / "model.safetensors")
    return {
        "config": config, "wall_s": round(wall, 2),
        "cpu_s": round(ru1.ru_utime - ru0.ru_utime + ru1.ru_stime - ru0.ru_stime, 2),
        "passes_s": pass_times(proc.stdout), "loadavg_before": [round(x, 2) for x in load0],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()], "weights_sha256": weights,
        "command": " ".join(("OMP_NUM_THREADS=" + threads, *cmd)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--inter", type=int, default=1408)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--tokens", type=int, default=2048, help="importance and GPTQ calibration tokens")
    p.add_argument("--sens-tokens", type=int, default=256, help="tokens of each loss-sensitivity evaluation")
    p.add_argument("--repeats", type=int, default=1, help="rounds of the three configs (interleaved)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--work", type=Path, default=Path("/tmp/moeopt-bench-dist"))
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ", ".join(CONFIGS))
    p.add_argument("--label", default="default")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    sh = shape(args)
    name = f"dist-mixtral-h{args.hidden}-i{args.inter}-l{args.layers}-e{args.experts}"
    ckpt = random_mixtral(args.cache / name, sh)
    args.work.mkdir(parents=True, exist_ok=True)
    passes = pipeline(calibration(args.work, args.tokens), args)
    configs = [c for c in args.configs.split(",") if c]
    if not set(configs) <= set(CONFIGS) or "1proc-1thread" not in configs or "2ranks-1thread" not in configs:
        raise SystemExit(f"--configs: a subset of {', '.join(CONFIGS)} with 1proc-1thread and 2ranks-1thread")
    runs = []
    for r in range(args.repeats):
        for config in configs:
            res = run(config, ckpt, args.work / config, passes)
            res["round"] = r
            print(json.dumps({k: v for k, v in res.items() if k != "command"}), flush=True)
            runs.append(res)

    def best(config: str, key: str = "wall_s") -> float:
        return min(x[key] for x in runs if x["config"] == config)

    def best_pass(config: str, name: str) -> float:
        return min(x["passes_s"].get(name, float("nan")) for x in runs if x["config"] == config)

    def ratio(a: float, b: float) -> float:
        return round(a / b, 3)

    one, two = "1proc-1thread", "2ranks-1thread"
    summary: dict[str, Any] = {
        "speedup_wall": ratio(best(one), best(two)),
        "speedup_passes": ratio(best_pass(one, "total"), best_pass(two, "total")),
        "per_pass_speedup": {n: ratio(best_pass(one, n), best_pass(two, n)) for n in runs[0]["passes_s"]
                             if n != "total"},
        "cpu_s": {c: best(c, "cpu_s") for c in configs},
        "weights_equal_2ranks_vs_1thread": len({x["weights_sha256"] for x in runs if x["config"] in (one, two)}) == 1,
    }
    if "1proc-2threads" in configs:
        summary["speedup_wall_vs_2threads"] = ratio(best("1proc-2threads"), best(two))
        summary["speedup_passes_vs_2threads"] = ratio(best_pass("1proc-2threads", "total"), best_pass(two, "total"))
    result = {
        "label": args.label, "model": {"shape": sh, "checkpoint": str(ckpt)}, "pipeline": passes,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "note": "shared 2-core machine: compare configs only within a round at similar load averages; "
                "best of the rounds is summarised",
        "summary": summary, "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(args.out.read_text()) if args.out.exists() else {}
    data[args.label] = result
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(args.out)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
