"""A model larger than the device's memory: moeopt's offload artifact against llama.cpp's mmap, each run in
a memory cgroup below the 4-bit model's size (`memlimit.py`: the page cache counts against the limit, as
on a board with that much RAM), the page cache of the model files dropped before each run.

    PYTHONPATH=. .venv/bin/python bench/offload_large.py build                      # artifact (once, ~30 min)
    PYTHONPATH=. .venv/bin/python bench/offload_large.py run --limits 448MiB,300MiB,180MiB --margin 64MiB
    PYTHONPATH=. .venv/bin/python bench/offload_large.py gguf --ckpt CKPT --name 8x7b   # Q4_K_M via Q8_0

Engines, each in its own process inside the group, at each limit:

- ``moeopt-plan``: the offload artifact lowered with ``plan{budget=B}`` at that limit, when ``build
  --plan-limits L1,L2 --base BYTES`` made it (B = limit - base, the runtime's own footprint), run as
  `moeopt run` opens it (the plan's cache size and policy, the in-graph prefetcher);
- ``moeopt-budget`` otherwise: the all-cold artifact as ``moeopt run --budget B`` opens it (LFU, the
  in-graph prefetcher), B = max(the smallest cache, limit - the on-demand run's VmHWM - ``--margin``);
  ``moeopt-budget-min-precision0.5`` is the same with ``--prefetch-min-precision 0.5`` (``--guard``):
  the prefetcher stops once fewer than half its prefetches were used;
- ``moeopt-on-demand``: the all-cold artifact at its smallest cache, every chosen expert read when
  the router picks it (EdgeMoE's baseline);
- ``llama.cpp``: the same weights as GGUF Q4_K_M (its converter, then `llama-quantize`), `llama-bench`
  with mmap (``-lm mmap``), with its default CPU repacking (``--repack 1``: repacked weights are copied to
  anonymous memory) and without (``--repack 0``: the weights stay in the mapped file).

Measured per run: prefill and decode tok/s, bytes read from disk per decoded token, peak RSS (the
process's VmHWM) and the group's peak (page cache included), time to first token from process start,
OOM kills. Bytes read are the task's I/O accounting (``/proc/PID/io`` read_bytes, what ``getrusage``'s
ru_inblock counts): moeopt reads its own before and after the decode loop; llama-bench runs as a
prefill-only process (``-p P -n 0``: time to first token = its wall time, load + one prompt batch) and
two decode-only processes (``-n N`` and ``-n N/4``), whose difference in bytes read over the difference
in tokens is the per-token figure (the load's reads cancel). Greedy tokens of each moeopt run are
compared with the all-resident run of the same artifact (outside the cgroup), ``tokens_identical``.

The model is a parameter (``--ckpt``): the ~1B random Mixtral of bench/runtime.py by default, or the
synthetic 8x7B-shaped checkpoint of bench/scale.py once the streaming compile can lower it
(``--artifact`` names a prebuilt offload artifact, ``--gguf`` a prebuilt GGUF). Timings on a shared
machine are rough; the lead reruns it on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memlimit
from runtime import BIG, DEFAULT_CACHE, REPO, random_mixtral

QUANT = "quantize{method=uniform,bits=4,group=64,non-experts=4,lm-head=true}"  # Q4_K_M's coverage
OUT = REPO / "bench" / "results" / "offload-large"


def model_dir(args: argparse.Namespace) -> Path:
    return args.cache / "offload-large" / args.name


def artifact_dir(args: argparse.Namespace, plan_limit: int | None = None) -> Path:
    if plan_limit is None:
        return args.artifact or model_dir(args) / "offload-q4-hot0"
    return model_dir(args) / f"offload-q4-plan{plan_limit >> 20}MiB"


def ckpt_dir(args: argparse.Namespace) -> Path:
    return args.ckpt or random_mixtral(args.cache / "mixtral-1b", BIG)


# --- build -------------------------------------------------------------------------------------------------


def calib_ids(path: Path, vocab: int, tokens: int) -> Path:
    """Random token ids (seed 1; the timed prompt is seed 0) as calibration JSONL: the random model's routing
    has no text to prefer, and no prepared data set is needed."""
    rng = np.random.default_rng(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"ids": rng.integers(1, vocab, 128).tolist()} for _ in range(max(1, tokens // 128))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build(args: argparse.Namespace) -> None:
    """Quantize (every linear 4-bit, as Q4_K_M), train the routing predictor, lower all-cold; then one
    planned artifact per ``--plan-limits`` entry (its expert budget = limit - ``--base``)."""
    import torch

    import moeopt
    from moeopt.lower import lower
    from moeopt.passes import PassManager

    torch.set_num_threads(args.threads)
    out = artifact_dir(args)
    plan_limits = [memlimit.parse_size(s) for s in args.plan_limits.split(",") if s]
    todo = [lim for lim in plan_limits if not (artifact_dir(args, lim) / "manifest.json").exists()]
    if (out / "manifest.json").exists() and not todo:
        print(f"built: {out}")
        return
    model = moeopt.load(ckpt_dir(args))
    model.config.output_router_logits = False
    calib = args.calib or calib_ids(model_dir(args) / "calib.jsonl", int(model.config.vocab_size), args.calib_tokens)
    passes = (f"importance{{calib={calib},max-tokens={args.calib_tokens},progress=false}},{QUANT},"
              f"predictor{{calib={calib},max-tokens={args.calib_tokens}}}")
    t0 = time.perf_counter()
    PassManager(passes).run(model)
    t1 = time.perf_counter()
    info: dict[str, Any] = {"passes": passes, "passes_s": round(t1 - t0, 1)}
    if not (out / "manifest.json").exists():
        lower(model, out, experts="offload", hot=0, pipeline=passes)
        info["lower_s"] = round(time.perf_counter() - t1, 1)
        (out.parent / f"{out.name}.info.json").write_text(json.dumps(info, indent=1))
        print(f"built: {out} ({info})", flush=True)
    for lim in todo:
        budget = lim - memlimit.parse_size(args.base)
        t2 = time.perf_counter()
        PassManager(f"plan{{budget={budget}}}").run(model)
        dst = artifact_dir(args, lim)
        lower(model, dst, experts="offload", pipeline=passes + f",plan{{budget={budget}}}")
        plan = model.plan
        model.plan = None
        meta = {"limit_bytes": lim, "base": args.base, "budget_bytes": budget,
                "lower_s": round(time.perf_counter() - t2, 1),
                "hot": [len(h) for h in plan["hot"]], "cache_bytes": plan["cache_bytes"], "policy": plan["policy"]}
        (dst.parent / f"{dst.name}.info.json").write_text(json.dumps(meta, indent=1))
        print(f"built: {dst} ({meta})", flush=True)


# --- one moeopt run (a child process, inside the group) -------------------------------------------------


def _read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def child(args: argparse.Namespace) -> None:
    """Open the artifact as `moeopt run` would (``--mode``), prefill the seeded prompt, decode greedily;
    print one JSON line. ``--launch`` is the parent's clock at spawn: time to first token counts the
    process start, imports and opening, as a user waits for them."""
    from moeopt.runtime import OffloadSession
    from moeopt.runtime.cli import offload_source
    from moeopt.runtime.manifest import read_manifest
    from moeopt.runtime.offload_format import OffloadIndex

    art = args.artifact
    r0 = _read_bytes()
    manifest = read_manifest(art, verify=False)
    index = OffloadIndex.from_manifest(manifest)
    plan = manifest.get("plan") or {}
    keep = args.page_cache == "keep"
    guard = args.min_precision or None
    if args.mode == "resident":
        source = None
    elif args.mode == "on-demand":
        source = offload_source(art, str(index.min_budget()), "on-demand", "auto", keep)
    elif args.mode == "plan":
        source = offload_source(art, "", "", "auto", keep, guard)
    else:  # budget: the all-cold artifact at this expert cache
        source = offload_source(art, str(args.budget), "", "auto", keep, guard)
    sess = OffloadSession(art, source=source, threads=args.threads)
    opened = time.time()
    r_open = _read_bytes()
    prompt = np.random.default_rng(0).integers(1, int(manifest["vocab_size"]), (1, args.prompt), dtype=np.int64)
    first: list[float] = []
    snap: dict[str, Any] = {}

    def numbers() -> dict[str, float]:
        c = getattr(sess.source, "counters", None)
        got = dict(vars(sess.timing)) | ({k: v for k, v in c.as_dict().items() if isinstance(v, int | float)}
                                         if c is not None else {})
        return {k: float(v) for k, v in got.items() if isinstance(v, int | float)}

    def on_token(*_step: Any) -> None:
        if not first:
            first.extend([time.time(), float(_read_bytes())])
            snap.update(numbers())

    gen = sess.generate(prompt, max_new_tokens=args.new, stop_tokens=[], on_token=on_token)
    r_end = _read_bytes()
    out = {
        "mode": args.mode, "page_cache": args.page_cache, "min_precision": guard, "artifact": str(art),
        "threads": args.threads,
        "source": type(sess.source).__name__, "policy": getattr(sess.source, "policy_name", None),
        "cache_bytes": args.budget if args.mode == "budget" else (
            index.min_budget() if args.mode == "on-demand" else plan.get("cache_bytes")),
        "prefetcher": type(getattr(sess.source, "prefetcher", None)).__name__,
        "plan": {k: plan.get(k) for k in ("budget_bytes", "cache_bytes", "policy")} | (
            {"hot_experts": sum(len(h) for h in plan["hot"])} if plan else {}),
        "open_s": round(opened - args.launch, 3), "ttft_s": round(first[0] - args.launch, 3),
        "prefill_s": round(gen.prefill_seconds, 4), "prefill_tok_s": round(args.prompt / gen.prefill_seconds, 2),
        "decode_tok_s": round(gen.decode_tokens_per_s, 3),
        "read_bytes_open": r_open - r0, "read_bytes_prefill": int(first[1]) - r_open,
        "read_bytes_decode": r_end - int(first[1]), "decode_tokens": args.new - 1,
        "read_bytes_per_token": round((r_end - first[1]) / max(1, args.new - 1)),
        "vm_hwm_bytes": _vm_hwm(), "tokens": gen.sequences[0, args.prompt:].tolist(),
    }
    end = numbers()  # where the decode steps' time went (segments, cold experts, waiting for reads)
    out["decode_breakdown"] = {k: round(end[k] - snap.get(k, 0.0), 4) for k in (
        "steps", "segments_s", "cold_s", "stall_s", "cold_experts", "hits", "misses", "loads", "bytes_read",
        "stall_seconds", "prefetch_issued", "prefetch_used", "evictions") if k in end}
    print("RESULT " + json.dumps(out), flush=True)
    close = getattr(sess.source, "close", None)
    if close is not None:
        close()


# --- the comparison ----------------------------------------------------------------------------------------


def _parse_result(stdout: str) -> dict[str, Any] | None:
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[7:]))
    return None


def run_moeopt(args: argparse.Namespace, art: Path, mode: str, limit: int | None, budget: int = 0,
               page_cache: str = "keep", min_precision: float = 0.0) -> dict[str, Any]:
    """One moeopt child in a group at `limit` (None: no limit, 64 GiB), its artifact's page cache dropped."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "child", "--artifact", str(art), "--mode", mode,
           "--page-cache", page_cache, "--min-precision", str(min_precision),
           "--budget", str(budget), "--prompt", str(args.prompt), "--new", str(args.new),
           "--threads", str(args.threads), "--launch", repr(time.time())]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with open(args.work / "child.out", "w+b") as fh:
        res = memlimit.run_limited(cmd, limit or 64 << 30, drop=[art], stdout=fh, env=env, timeout=args.timeout)
        fh.seek(0)
        out = _parse_result(fh.read().decode(errors="replace"))
    return _summary(res) | (out or {"failed": True, "mode": mode})


def _summary(res: dict[str, Any]) -> dict[str, Any]:
    keep = ("limit_bytes", "controller", "wall_s", "returncode", "signal", "timed_out", "max_rss_bytes",
            "peak_bytes", "peak_source", "oom_killed", "oom_kills", "failcnt", "block_reads", "major_faults")
    out = {k: res.get(k) for k in keep}
    out["process_read_bytes"] = int(res.get("block_reads") or 0) * 512
    out["dropped"] = res.get("dropped", {}).get("how")
    return out


def llama_cmd(args: argparse.Namespace, p: int, n: int, repack: int, warmup: bool) -> list[str]:
    from runtime import find_tool

    tool = find_tool("llama-bench")
    if tool is None:
        raise SystemExit("offload_large: llama-bench not found (python -m bench.llama_tools build)")
    cmd = [str(tool), "-m", str(args.gguf), "-p", str(p), "-n", str(n), "-t", str(args.threads), "-r", "1",
           "-lm", "mmap", "--repack", str(repack), "-o", "json"]
    return cmd + ([] if warmup else ["--no-warmup"])


def _llama_once(args: argparse.Namespace, cmd: list[str], limit: int | None) -> tuple[dict[str, Any], dict[str, Any]]:
    with open(args.work / "llama.out", "w+b") as fh:
        res = memlimit.run_limited(cmd, limit or 64 << 30, drop=[args.gguf], stdout=fh, timeout=args.timeout)
        fh.seek(0)
        text = fh.read().decode(errors="replace")
    try:
        tests = json.loads(text)
    except ValueError:
        tests = []
    return _summary(res), (tests[0] if tests else {})


def run_llama(args: argparse.Namespace, limit: int | None, repack: int) -> dict[str, Any]:
    """Prefill-only (TTFT, prefill tok/s), then decode-only at N and N/4 tokens (tok/s, bytes per token)."""
    short = max(1, args.new // 4)
    pre, pre_t = _llama_once(args, llama_cmd(args, args.prompt, 0, repack, False), limit)
    dec, dec_t = _llama_once(args, llama_cmd(args, 0, args.new, repack, True), limit)
    dsh, _ = _llama_once(args, llama_cmd(args, 0, short, repack, True), limit)
    out: dict[str, Any] = {"mode": f"llama.cpp-Q4_K_M-mmap-repack{repack}", "gguf": str(args.gguf),
                           "command": " ".join(llama_cmd(args, 0, args.new, repack, True)[1:]),
                           "prefill_run": pre, "decode_run": dec, "decode_short_run": dsh}
    failed = [r for r in (pre, dec, dsh) if r["returncode"] != 0]
    out["oom_killed"] = any(r.get("oom_killed") for r in (pre, dec, dsh))
    if failed:
        out["failed"] = True
        return out
    out.update({
        "ttft_s": pre["wall_s"], "prefill_tok_s": round(float(pre_t.get("avg_ts", 0.0)), 2),
        "decode_tok_s": round(float(dec_t.get("avg_ts", 0.0)), 3),
        "read_bytes_per_token": round((dec["process_read_bytes"] - dsh["process_read_bytes"]) / (args.new - short)),
        "max_rss_bytes": dec["max_rss_bytes"], "peak_bytes": dec["peak_bytes"],
    })
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    args.work.mkdir(parents=True, exist_ok=True)
    hot0 = artifact_dir(args)
    files = [f for f in hot0.iterdir() if f.is_file()]
    art_bytes = sum(f.stat().st_size for f in files)
    expert_bytes = (hot0 / "experts.bin").stat().st_size
    gguf_bytes = args.gguf.stat().st_size
    result: dict[str, Any] = {
        "model": {"checkpoint": str(ckpt_dir(args)), "artifact": str(hot0), "artifact_bytes": art_bytes,
                  "expert_file_bytes": expert_bytes, "gguf": str(args.gguf), "gguf_bytes": gguf_bytes},
        "settings": {"prompt": args.prompt, "new": args.new, "threads": args.threads,
                     "machine": platform.node(), "load_avg_start": os.getloadavg()},
        "runs": [],
    }
    print(f"artifact {art_bytes / 2**20:.0f} MiB (experts {expert_bytes / 2**20:.0f} MiB), "
          f"GGUF {gguf_bytes / 2**20:.0f} MiB", flush=True)
    # the reference: every expert resident, no limit (its tokens are what every offload run must produce)
    ref = run_moeopt(args, hot0, "resident", None)
    ref["limit"] = None
    result["runs"].append(ref)
    print(json.dumps({k: ref.get(k) for k in ("mode", "decode_tok_s", "ttft_s", "max_rss_bytes")}), flush=True)
    base = run_moeopt(args, hot0, "on-demand", None)  # the runtime's own footprint at its smallest cache
    base["limit"] = None
    result["runs"].append(base)
    result["base_bytes"] = {"moeopt_on_demand_vm_hwm": base.get("vm_hwm_bytes"),
                            "moeopt_on_demand_group_peak": base.get("peak_bytes")}
    if not args.no_llama:
        lb = run_llama(args, None, 0)
        lb["limit"] = None
        result["runs"].append(lb)
        result["base_bytes"]["llama_repack0_vm_hwm"] = lb.get("max_rss_bytes")
    print(json.dumps(result["base_bytes"]), flush=True)
    limits = [memlimit.parse_size(s) for s in args.limits.split(",")]
    from moeopt.runtime.manifest import read_manifest
    from moeopt.runtime.offload_format import OffloadIndex

    min_budget = OffloadIndex.from_manifest(read_manifest(hot0, verify=False)).min_budget()
    margin = memlimit.parse_size(args.margin)
    for lim in limits:
        planned = artifact_dir(args, lim)
        rows: list[dict[str, Any]] = []
        for pc in ("keep", "drop") if args.page_cache == "both" else (args.page_cache,):
            for guard in (0.0, args.guard) if args.guard else (0.0,):
                if (planned / "manifest.json").exists():
                    rows.append(run_moeopt(args, planned, "plan", lim, page_cache=pc, min_precision=guard))
                else:
                    budget = max(min_budget, lim - int(base.get("vm_hwm_bytes") or 0) - margin)
                    rows.append(run_moeopt(args, hot0, "budget", lim, budget, pc, guard)
                                | {"budget_rule": f"max(min budget, limit - on-demand VmHWM - {args.margin})"})
            rows.append(run_moeopt(args, hot0, "on-demand", lim, page_cache=pc))
        if not args.no_llama:
            for repack in (0, 1) if args.llama_repack == "both" else (int(args.llama_repack),):
                rows.append(run_llama(args, lim, repack))
        for r in rows:
            r["limit"] = lim
            r["label"] = label(r)
            if "tokens" in r:
                r["tokens_identical"] = r["tokens"] == ref.get("tokens")
            print(json.dumps({k: r.get(k) for k in ("limit", "mode", "decode_tok_s", "prefill_tok_s", "ttft_s",
                                                     "read_bytes_per_token", "max_rss_bytes", "peak_bytes",
                                                     "oom_killed", "tokens_identical")}), flush=True)
        result["runs"] += rows
    moe = [r for r in result["runs"] if r.get("limit") and "tokens" in r]
    result["tokens_identical_all"] = bool(moe) and all(r.get("tokens_identical") for r in moe)
    result["settings"]["load_avg_end"] = os.getloadavg()
    return result


def label(row: dict[str, Any]) -> str:
    """The series a run belongs to in the plot and the table."""
    mode = str(row.get("mode", "?"))
    if mode.startswith("llama"):
        return mode
    return (f"moeopt-{mode}" + (f"-min-precision{row['min_precision']:g}" if row.get("min_precision") else "")
            + ("" if row.get("page_cache", "keep") == "keep" else "-no-page-cache"))


def plot(result: dict[str, Any], path: Path) -> None:
    """Decode tok/s against the limit (log scale), one line per engine; OOM-killed or failed runs as x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    runs = [r for r in result["runs"] if r.get("limit")]
    floor = min([r["decode_tok_s"] for r in runs if r.get("decode_tok_s")] or [0.1]) / 2
    for i, mode in enumerate(sorted({label(r) for r in runs})):
        color = f"C{i}"
        rows = sorted((r for r in runs if label(r) == mode), key=lambda r: r["limit"])
        ok = [(r["limit"] / 2**20, r["decode_tok_s"]) for r in rows if r.get("decode_tok_s")]
        bad = [r["limit"] / 2**20 for r in rows if not r.get("decode_tok_s")]
        ax.plot([p[0] for p in ok], [p[1] for p in ok], marker="o", color=color, label=mode)
        if bad:
            ax.scatter(bad, [floor] * len(bad), marker="x", color=color)
    for r in result["runs"]:
        if r.get("limit") is None and r.get("mode") == "resident" and r.get("decode_tok_s"):
            ax.axhline(r["decode_tok_s"], ls=":", lw=0.8, color="grey")
            ax.annotate("moeopt all resident, no limit", (ax.get_xlim()[0], r["decode_tok_s"]), fontsize=7,
                        color="grey", va="bottom")
    ax.axvline(result["model"]["gguf_bytes"] / 2**20, ls="--", color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("memory limit of the cgroup, page cache included (MiB; dashed: the Q4_K_M file)")
    ax.set_ylabel("decode tokens/s (x: OOM-killed or refused)")
    ax.set_title("Below the 4-bit model's size: moeopt offload vs llama.cpp mmap")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_main(args: argparse.Namespace) -> None:
    if args.gguf is None:
        args.gguf = args.cache / args.name / "gguf" / "model-Q4_K_M.gguf"
    args.work = Path(f"/tmp/offload-large-{os.getpid()}")
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out / f"{args.name}.png")
    print(f"wrote {args.out / (args.name + '.json')}")


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=("build", "gguf", "run", "child", "plot"))
    ap.add_argument("--ckpt", type=Path, help="checkpoint (default: bench/runtime.py's ~1B random Mixtral)")
    ap.add_argument("--name", default="1b", help="folder name of this model's artifacts under <cache>/offload-large")
    ap.add_argument("--artifact", type=Path, help="a prebuilt all-cold offload artifact")
    ap.add_argument("--gguf", type=Path, help="a prebuilt GGUF (default: bench/runtime.py's Q4_K_M of the ~1B)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--calib", type=Path, help="calibration JSONL (default: random ids, see calib_ids)")
    ap.add_argument("--calib-tokens", type=int, default=1024)
    ap.add_argument("--plan-limits", default="", help="build: a planned artifact per limit, e.g. 470MiB,314MiB")
    ap.add_argument("--base", default="0", help="the runtime's own footprint (limit - base = the plan's expert budget)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limits", default="470MiB,314MiB,190MiB", help="run: memory limits of the cgroup")
    ap.add_argument("--margin", default="16MiB", help="run without a planned artifact: the expert cache is the "
                    "limit less the on-demand run's VmHWM less this")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--page-cache", choices=("keep", "drop", "both"), default="keep",
                    help="moeopt: keep the expert file's pages after a read, or drop them (--no-page-cache)")
    ap.add_argument("--llama-repack", choices=("0", "1", "both"), default="both")
    ap.add_argument("--guard", type=float, default=0.5, help="also run the budgeted cache with the graph "
                    "prefetcher stopped below this precision (moeopt run --prefetch-min-precision; 0: not)")
    ap.add_argument("--out", type=Path, default=OUT)
    # child
    ap.add_argument("--mode", choices=("resident", "on-demand", "plan", "budget"))
    ap.add_argument("--budget", type=int, default=0)
    ap.add_argument("--launch", type=float, default=0.0)
    ap.add_argument("--min-precision", type=float, default=0.0)
    return ap


def main() -> None:
    args = make_parser().parse_args()
    if args.stage == "plot":
        src = args.out / f"{args.name}.json"
        plot(json.loads(src.read_text()), src.with_suffix(".png"))
    elif args.stage == "build":
        build(args)
    elif args.stage == "gguf":  # Q4_K_M of --ckpt, through a Q8_0 file (half an f16 one) deleted after
        from runtime import gguf_of

        t0 = time.perf_counter()
        path = gguf_of(ckpt_dir(args), args.cache / args.name / "gguf", "Q4_K_M", via="q8_0", keep_via=False)
        print(f"built: {path} ({path.stat().st_size / 2**30:.2f} GiB, {time.perf_counter() - t0:.0f} s)")
    elif args.stage == "run":
        run_main(args)
    else:
        child(args)


if __name__ == "__main__":
    main()
