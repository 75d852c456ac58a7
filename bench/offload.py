"""Serving under a memory budget: decode tokens/s, peak RSS, hit rate and stall time of an offload
artifact (``lower{experts=offload}``) for expert-cache budgets from 100% down to 15% of the offloaded
expert bytes, for each way of feeding the cache:

- resident: every offloaded expert read into memory once (`AllResident`), the no-I/O reference;
- on-demand: the smallest cache that runs (one layer's working set), each chosen expert read when the
  router picks it (no reuse beyond that): EdgeMoE's on-demand baseline, independent of the budget;
- lru: a cache of the budget with LRU replacement, reads on a miss, no prefetching;
- edgemoe: EdgeMoE's eviction (frequency + layer distance) and its statistics-table prefetcher fitted on
  the routing trace of a different text (calibration);
- predictor: LRU cache + prefetch of the experts the in-graph routing predictor (LiteMoE's MLP lowered
  after layer 0's router) names for every later layer;
- committee: SwapMoE's resident committee (the router is masked to the experts in memory; routing
  changes, so its quality cost is measured against the resident tokens);
- oracle: LRU cache + prefetch of the true routing of this very run (replayed from a recorded trace),
  the upper bound of any predictor.

Every configuration runs in its own process with the expert file dropped from the page cache first
(``posix_fadvise(DONTNEED)``, no root needed), so reads hit storage and each peak RSS (VmHWM) is that
run's own. Writes offload.json and offload.png.

This machine's storage is fast (a 140 KB record in ~0.1-0.3 ms from its virtio disk), so loads here
are bound by the CPU that builds each expert's session. ``--storage-mbps`` (with
``--storage-latency-ms``) models an edge board's slower storage instead (`SlowStorage`: every cold
read takes at least latency + bytes / bandwidth, one read at a time); results then say so in
``settings`` and ``storage``, and are a model of that device's reads, not a measurement of it.

    .venv/bin/python bench/offload.py                          # reference model (real text prompt)
    .venv/bin/python bench/offload.py --model 1b --hot 0       # ~1B random Mixtral (builds once, ~10 min)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runtime import DEFAULT_CACHE, REPO, _rss_mb, checkpoint

METHODS = ("resident", "on-demand", "lru", "edgemoe", "predictor", "committee", "oracle")
BUDGETS = (1.0, 0.75, 0.5, 0.35, 0.25, 0.15)
APPS = "app:movie-sentiment;app:tweet-sentiment;app:fact-verification;app:intent;app:news-topic"


def artifact_path(args: argparse.Namespace) -> Path:
    top = f"-top{args.prefetch_top}" if args.prefetch_top else ""  # 0: lowering's default (the router's top_k)
    far = f"-far{args.far}" if args.far else ""
    early = f"-early{args.early}" if args.early else ""
    return args.cache / args.model / f"offload-4bit-hot{args.hot}{top}{far}{early}"


def build(args: argparse.Namespace) -> Path:
    """Quantize to 4 bits, train the routing predictor, lower in offload mode (cached)."""
    out = artifact_path(args)
    if (out / "manifest.json").exists():
        return out
    import moeopt
    from moeopt.lower import lower
    from moeopt.passes import PassManager

    model = moeopt.load(REPO / "moeopt" / "assets" / "reference-moe" if args.model == "reference"
                        else checkpoint(args.model, args.cache))
    model.config.output_router_logits = False
    tokens = 32768 if args.model == "reference" else 2048  # the ~1B model's forward is slow on 2 cores
    # importance first: the slots' routing frequencies go into the manifest (the committee's starting set)
    passes = (f"importance{{calib={APPS},max-tokens={tokens},progress=false}},"
              f"quantize{{method=uniform,bits=4,group=64}},predictor{{calib={APPS},max-tokens={tokens}"
              + (f",far={args.far}" if args.far else "") + f",early={args.early}}}")
    t0 = time.perf_counter()
    PassManager(passes).run(model)
    t1 = time.perf_counter()
    lower(model, out, experts="offload", hot=args.hot, pipeline=passes, prefetch_top=args.prefetch_top or None)
    info = {"passes": passes, "hot": args.hot, "prefetch_top": args.prefetch_top, "passes_s": round(t1 - t0, 1),
            "lower_s": round(time.perf_counter() - t1, 1)}
    (out.parent / f"{out.name}.info.json").write_text(json.dumps(info, indent=1))
    return out


def prompts(args: argparse.Namespace, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """(evaluation prompt, calibration prompt), (1, prompt) each: news test text for the reference
    model (its routing is real), random ids for the random ~1B model."""
    if args.model != "reference":
        rng = np.random.default_rng(0)
        return (rng.integers(1, vocab, (1, args.prompt), dtype=np.int64),
                rng.integers(1, vocab, (1, args.prompt), dtype=np.int64))
    from tokenizers import Tokenizer

    from moeopt.data.apps import default_data_root, lm_split

    tok = Tokenizer.from_file(str(REPO / "moeopt" / "assets" / "reference-moe" / "tokenizer.json"))
    docs = [r["text"] for r in lm_split(default_data_root(), "news", "test")[:2]]
    ids = [tok.encode(d).ids[: args.prompt] for d in docs]
    return np.array([ids[0]], dtype=np.int64), np.array([ids[1]], dtype=np.int64)


def run_child(args: argparse.Namespace, method: str, frac: float) -> dict[str, Any]:
    """One generation with `method` at `frac` of the offloaded expert bytes; returns its figures."""
    from moeopt.runtime import OffloadSession, read_manifest
    from moeopt.runtime.expert_cache import ExpertCache, slot_importance
    from moeopt.runtime.expert_store import ExpertStore, SlowStorage
    from moeopt.runtime.offload import AllResident
    from moeopt.runtime.offload_format import OffloadIndex, frames_for_budget
    from moeopt.runtime.packed_frames import FramePacker
    from moeopt.runtime.prefetch import GraphHints, Oracle, Recorder, StatsTable, load_trace, save_trace

    art = artifact_path(args)
    manifest = read_manifest(art, verify=False)
    index = OffloadIndex.from_manifest(manifest)
    slot_of = [la["slot_of"] for la in manifest["layers"]]
    total = index.cold_bytes()
    budget = total if method == "resident" else (
        index.min_budget() if method == "on-demand" else max(index.min_budget(), int(frac * total)))
    work = args.out / "work"
    prompt, calib = prompts(args, int(manifest["vocab_size"]))
    with ExpertStore(art, index) as store:
        store.drop_page_cache()

    packed = args.kernel == "packed"
    storage = SlowStorage(args.storage_mbps * 1e6, args.storage_latency_ms / 1e3) if args.storage_mbps else None

    def source(index: OffloadIndex, path: Path) -> Any:
        if method == "resident":
            return Recorder(AllResident(index, path, packed=packed, threads=args.expert_threads))
        policy = {"on-demand": "on-demand", "edgemoe": "edgemoe", "committee": "committee", "lru": "lru"}.get(
            method, args.prefetch_policy)
        prefetcher: Any = None
        if method == "edgemoe":
            prefetcher = StatsTable().fit(load_trace(work / "trace-calib.json"))
        elif method == "predictor":  # one layer ahead: further hints cost frames (and reads) for less recall
            prefetcher = GraphHints(depth=args.predictor_depth or None, width=args.predictor_width or None)
        elif method == "oracle":
            prefetcher = Oracle(load_trace(work / "trace-eval.json"), depth=args.oracle_depth or len(index.top_k),
                                causal=bool(args.oracle_causal))
        packer = FramePacker(index, path, manifest.get("target"), args.expert_threads) if packed else None
        return ExpertCache(path, index, budget, policy, prefetcher, io_threads=args.io_threads, slot_of=slot_of,
                           prior=slot_importance(manifest["layers"]), packer=packer, storage=storage)

    t0 = time.perf_counter()
    sess = OffloadSession(art, source=source, threads=args.threads, verify=False, token_hints=bool(args.token_hints),
                          early_hints=bool(args.early_hints))
    open_s = time.perf_counter() - t0
    gen = sess.generate(prompt, max_new_tokens=args.new, keep_logits=True, stop_tokens=[], sampler=sampler(args))
    out: dict[str, Any] = {
        "method": method, "budget_fraction": frac, "budget_bytes": budget,
        "frames": frames_for_budget(index, budget) if method != "resident" else None,
        "open_s": round(open_s, 3), "prefill_s": round(gen.prefill_seconds, 4),
        "decode_tok_s": round(gen.decode_tokens_per_s, 3), "peak_rss_mb": round(_rss_mb(), 1),
        "timing": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in vars(sess.timing).items()},
    }
    counters = getattr(sess.source, "counters", None)
    if counters is not None:
        out["counters"] = counters.as_dict()
    logits = np.stack(gen.step_logits)  # (steps, 1, V)
    if method == "resident":
        work.mkdir(parents=True, exist_ok=True)
        np.savez(work / "resident.npz", tokens=gen.sequences, logits=logits)
        save_trace(sess.source.trace, work / "trace-eval.json")
        rec = OffloadSession(art, threads=args.threads, verify=False, source=lambda i, p: Recorder(
            AllResident(i, p, packed=packed, threads=args.expert_threads)))
        rec.generate(calib, max_new_tokens=args.new, stop_tokens=[], sampler=sampler(args))
        save_trace(rec.source.trace, work / "trace-calib.json")
    else:
        ref = np.load(work / "resident.npz")
        n = min(len(ref["logits"]), len(logits))
        out["tokens_identical"] = bool(np.array_equal(ref["tokens"], gen.sequences))
        out["max_logit_diff"] = float(np.abs(ref["logits"][:n] - logits[:n]).max())
        out["token_agreement"] = float((ref["tokens"] == gen.sequences).mean())
    close = getattr(sess.source, "close", None)
    if close is not None:
        close()
    return out


def resident_bytes(manifest: dict[str, Any]) -> int:
    """Bytes of everything but the expert file: segment and cold graphs (with their weights)."""
    return sum(e["bytes"] for name, e in manifest["files"].items() if name != manifest["offload"]["file"])


def _spawn(args: argparse.Namespace, method: str, frac: float, rnd: int = 0) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--model", args.model, "--hot", str(args.hot), "--cache", str(args.cache),
           "--out", str(args.out.parent), "--threads", str(args.threads), "--expert-threads", str(args.expert_threads),
           "--prompt", str(args.prompt), "--new", str(args.new), "--kernel", args.kernel,
           "--predictor-depth", str(args.predictor_depth),
           "--predictor-width", str(args.predictor_width), "--prefetch-top", str(args.prefetch_top),
           "--prefetch-policy", args.prefetch_policy, "--io-threads", str(args.io_threads),
           "--oracle-depth", str(args.oracle_depth), "--oracle-causal", str(args.oracle_causal),
           "--far", str(args.far), "--token-hints", str(args.token_hints),
           "--early", str(args.early), "--early-hints", str(args.early_hints),
           "--temperature", str(args.temperature), "--top-p", str(args.top_p),
           "--storage-mbps", str(args.storage_mbps), "--storage-latency-ms", str(args.storage_latency_ms),
           "--child", method, str(frac)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return {"method": method, "budget_fraction": frac, "round": rnd,
                "error": (res.stderr.strip().splitlines() or ["(no output)"])[-1]}
    return {**json.loads(res.stdout.strip().splitlines()[-1]), "round": rnd}


def median_runs(every: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (method, budget), the run with the median decode tokens/s, with every run's figure beside it
    in ``decode_tok_s_runs`` (timings on 2 shared cores vary by tens of percent between runs)."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in every:
        groups.setdefault((r["method"], r["budget_fraction"]), []).append(r)
    out = []
    for rs in groups.values():
        ok = sorted((r for r in rs if "error" not in r), key=lambda r: r["decode_tok_s"])
        if not ok:
            out.append(rs[0])
            continue
        out.append({**ok[(len(ok) - 1) // 2], "decode_tok_s_runs": [r["decode_tok_s"] for r in ok]})
    return out


def paired_shares(every: list[dict[str, Any]], frac: float) -> list[float]:
    """The predictor's share of the oracle's gain over on-demand within each round (the three ran minutes
    apart, so a slow spell of the shared machine hits them alike), for rounds where the oracle gained."""
    out = []
    for rnd in sorted({r.get("round", 0) for r in every}):
        by = {r["method"]: r["decode_tok_s"] for r in every if r.get("round", 0) == rnd and "error" not in r
              and (r["budget_fraction"] == frac or r["method"] == "on-demand")}
        if {"predictor", "oracle", "on-demand"} <= set(by) and by["oracle"] > by["on-demand"]:
            out.append(round((by["predictor"] - by["on-demand"]) / (by["oracle"] - by["on-demand"]), 3))
    return out


def summarise(runs: list[dict[str, Any]], every: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Acceptance figures: predictor vs on-demand / LRU, and its share of the oracle's gain, per budget
    (of the median runs; with `every` run, also per round and the median of those)."""
    by = {(r["method"], r["budget_fraction"]): r for r in runs if "error" not in r}
    out: dict[str, Any] = {}
    for frac in sorted({r["budget_fraction"] for r in runs}, reverse=True):
        row: dict[str, Any] = {}
        pred, orac = by.get(("predictor", frac)), by.get(("oracle", frac))
        for base in ("on-demand", "lru"):
            b = by.get((base, frac)) or next((r for (m, _), r in by.items() if m == base == "on-demand"), None)
            if pred is None or orac is None or b is None:
                continue
            gain_p = pred["decode_tok_s"] - b["decode_tok_s"]
            gain_o = orac["decode_tok_s"] - b["decode_tok_s"]
            row[f"vs_{base}"] = {"predictor_gain_tok_s": round(gain_p, 3), "oracle_gain_tok_s": round(gain_o, 3),
                                 "share_of_oracle_gain": round(gain_p / gain_o, 3) if gain_o > 0 else None}
        if every is not None and (shares := paired_shares(every, frac)):
            row["paired_share_of_oracle_gain"] = {"per_round": shares, "median": float(np.median(shares))}
        out[str(frac)] = row
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in result["runs"] if "error" not in r]
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, m in enumerate(METHODS):
        rs = sorted((r for r in runs if r["method"] == m), key=lambda r: r["budget_fraction"])
        if not rs:
            continue
        x = [100 * r["budget_fraction"] for r in rs]
        style = {"marker": "o", "label": m, "color": f"C{i}"}  # one colour per method in every panel
        a1.plot(x, [r["decode_tok_s"] for r in rs], **style)
        a2.plot(x, [r["peak_rss_mb"] for r in rs], **style)
        if m != "resident":  # hits over hits + misses (the committee's warm-up reads count as misses)
            a3.plot(x, [r["counters"]["hits"] / max(1, r["counters"]["hits"] + r["counters"]["misses"])
                        for r in rs], **style)
    a1.set(xlabel="expert budget (% of offloaded expert bytes)", ylabel="decode tokens/s", title="decode speed")
    a2.set(xlabel="expert budget (%)", ylabel="peak RSS (MB)", title="peak memory")
    a3.set(xlabel="expert budget (%)", ylabel="hit rate", title="cache hit rate")
    a1.legend(fontsize=8)
    title = f"offload artifact, {result['model']}: {result['settings']}"
    fig.suptitle(textwrap.fill(title, 190), fontsize=9)  # the settings line is longer than the figure
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _in_range(low: float, high: float, *, zero: bool = False) -> Any:
    """An argparse type: a float in (low, high], or 0 with `zero` (anything else is a one-line usage error)."""
    def parse(text: str) -> float:
        value = float(text)
        if not (low < value <= high or (zero and value == 0.0)):
            raise argparse.ArgumentTypeError(f"must be {'0 or ' if zero else ''}in ({low:g}, {high:g}], got {value:g}")
        return value
    parse.__name__ = "float"
    return parse


NON_NEGATIVE = _in_range(0.0, float("inf"), zero=True)
TEMPERATURE = NON_NEGATIVE  # 0: greedy
TOP_P = _in_range(0.0, 1.0)
PREFETCH_POLICIES = ("lru", "lfu", "fifo", "edgemoe")  # cache policies under the predictor and oracle methods


def sampler(args: argparse.Namespace) -> Any:
    """Greedy at temperature 0, else seeded sampling: every run of a bench decodes the same tokens."""
    from moeopt.runtime.sampling import Sampler

    if args.temperature == 0:
        return Sampler()
    return Sampler(do_sample=True, temperature=args.temperature, top_p=args.top_p, seed=0)


def decoding(args: argparse.Namespace) -> str:
    """How the bench decodes, for its settings line."""
    if args.temperature == 0:
        return "greedy"
    return f"sampled (temperature {args.temperature:g}, top-p {args.top_p:g}, seed 0)"


def _at_least(low: int) -> Any:
    """An argparse type: an int of at least `low` (anything else is a one-line usage error)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    parse.__name__ = "int"  # argparse names the type in "invalid int value: 'x'"
    return parse


def check_storage(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A usage error for a latency without a bandwidth (it would be ignored)."""
    if args.storage_latency_ms and not args.storage_mbps:
        ap.error("--storage-latency-ms models a slower device and needs --storage-mbps")


def storage_text(args: argparse.Namespace) -> str:
    if not args.storage_mbps:
        return "this machine's own"
    return f"emulated at {args.storage_mbps:g} MB/s + {args.storage_latency_ms:g} ms per read"


def make_parser() -> argparse.ArgumentParser:
    """The bench's options (also the defaults of `offload_sweep.py`'s runs)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="reference", choices=("reference", "1b"))
    ap.add_argument("--hot", type=int, default=0, help="hot (resident-graph) experts per layer")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "offload")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of the segments")
    ap.add_argument("--expert-threads", type=_at_least(1), default=1,
                    help="intra-op threads of each packed expert session")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--new", type=int, default=128, help="generated tokens")
    ap.add_argument("--temperature", type=TEMPERATURE, default=0.0,
                    help="0: greedy decoding; above 0: sampling at this temperature (seed 0, the same tokens in "
                         "every run): the reference model's greedy text soon loops over a few dozen tokens, whose "
                         "routing flatters any cache")
    ap.add_argument("--top-p", type=TOP_P, default=1.0, help="nucleus cut when sampling, in (0, 1]")
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="fractions of offloaded expert bytes")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--repeat", type=int, default=3, help="rounds of every method; the median run is reported")
    ap.add_argument("--kernel", default="packed", choices=("packed", "graph"),
                    help="cold experts as prepacked one-expert sessions, or the cold graph over the pool")
    ap.add_argument("--predictor-depth", type=int, default=1,
                    help="the predictor method acts on hints for this many layers ahead (0: every hint)")
    ap.add_argument("--predictor-width", type=int, default=0,
                    help="the predictor method prefetches this many of each token's hinted experts (0: all "
                         "the artifact names)")
    ap.add_argument("--prefetch-policy", default="lfu", choices=PREFETCH_POLICIES,
                    help="cache policy under the predictor and oracle methods")
    ap.add_argument("--oracle-depth", type=_at_least(0), default=0,
                    help="layers ahead the oracle hints (0: every layer, a whole step ahead: the upper bound)")
    ap.add_argument("--oracle-causal", type=int, choices=(0, 1), default=0,
                    help="1: the oracle hints the next step only after the step's last layer (what a predictor "
                         "that cannot see the next token could know at most)")
    ap.add_argument("--io-threads", type=_at_least(1), default=1, help="I/O threads of each expert cache")
    ap.add_argument("--token-hints", type=int, choices=(0, 1), default=1,
                    help="1: hint layer 0's experts of the token each step feeds, from the artifact's token table, "
                         "before the step's first segment (what sampling changes); 0: only the graph's hints")
    ap.add_argument("--prefetch-top", type=int, default=0,
                    help="experts each hint output of the artifact names (0: lowering's default, the router's top_k)")
    ap.add_argument("--far", type=_at_least(0), default=0,
                    help="train the predictor's far heads this wide (a separate artifact; 0: none, the pass's default)")
    ap.add_argument("--early", type=_at_least(0), default=64,
                    help="train the predictor's early head this wide (the next step's layer 0 from the last MoE "
                         "layer's input; 0: none, a separate artifact)")
    ap.add_argument("--early-hints", type=int, choices=(0, 1), default=1,
                    help="1: act on the artifact's early-head hints; 0: ignore them (the same artifact)")
    ap.add_argument("--storage-mbps", type=NON_NEGATIVE, default=0.0,
                    help="emulate storage of this many MB/s for cold reads (0: this machine's own)")
    ap.add_argument("--storage-latency-ms", type=NON_NEGATIVE, default=0.0,
                    help="with --storage-mbps: per-read latency of the emulated storage")
    ap.add_argument("--replot", action="store_true", help="redraw offload.png from offload.json and stop")
    ap.add_argument("--build-only", action="store_true", help="build (or find) the artifact and stop")
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "FRACTION"), help=argparse.SUPPRESS)
    return ap


def main() -> None:
    ap = make_parser()
    args = ap.parse_args()
    check_storage(ap, args)
    args.out = args.out / args.model
    if args.child:
        print(json.dumps(run_child(args, args.child[0], float(args.child[1]))))
        return
    if args.replot:
        if not (args.out / "offload.json").is_file():
            ap.error(f"--replot: {args.out / 'offload.json'} does not exist; run the bench first")
        plot(json.loads((args.out / "offload.json").read_text()), args.out / "offload.png")
        return
    t_start = time.perf_counter()
    art = build(args)
    if args.build_only:
        print(f"artifact: {art}")
        return
    from moeopt.runtime import read_manifest
    from moeopt.runtime.offload_format import OffloadIndex

    manifest = read_manifest(art, verify=False)
    index = OffloadIndex.from_manifest(manifest)
    methods = [m for m in args.methods.split(",") if m]
    budgets = [float(b) for b in args.budgets.split(",")]
    every = [_spawn(args, "resident", 1.0)]  # first: it records the traces the others replay or fit
    print(json.dumps(every[-1]), flush=True)
    for rep in range(args.repeat):  # rounds interleave the methods, so a slow spell hits them all alike
        if rep:
            every.append(_spawn(args, "resident", 1.0, rep))
        for frac in budgets:
            for m in methods:
                if m == "resident" or (m == "on-demand" and frac != budgets[0]):
                    continue  # neither depends on the budget
                every.append(_spawn(args, m, frac, rep))
                print(json.dumps(every[-1]), flush=True)
    runs = median_runs(every)
    result = {
        "model": args.model, "artifact": str(art),
        "settings": f"prompt {args.prompt}, {args.new} new tokens, {decoding(args)}, {args.threads} threads "
                    f"({args.expert_threads} per expert session), hot {args.hot}, "
                    f"{args.kernel} cold kernel, predictor depth {args.predictor_depth or 'all'}, "
                    f"width {args.predictor_width or 'all'} of {args.prefetch_top or 'top_k'}, "
                    f"{args.prefetch_policy} under predictor and oracle, oracle depth {args.oracle_depth or 'all'}"
                    f"{' (causal)' if args.oracle_causal else ''}, "
                    f"{args.io_threads} I/O thread(s), far heads {args.far or 'none'}, early head "
                    f"{args.early or 'none'}{'' if args.early_hints else ' (hints ignored)'}, "
                    f"token hints {'on' if args.token_hints else 'off'}, storage "
                    f"{storage_text(args)}, median of {args.repeat}",
        "storage": {"emulated": bool(args.storage_mbps), "mb_per_s": args.storage_mbps or None,
                    "latency_ms": args.storage_latency_ms if args.storage_mbps else None},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "offloaded_expert_bytes": index.cold_bytes(), "min_budget_bytes": index.min_budget(),
        "resident_bytes": resident_bytes(manifest), "runs": runs, "acceptance": summarise(runs, every),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "offload.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out / "offload.png")
    print(json.dumps(result["acceptance"], indent=1))


if __name__ == "__main__":
    main()
