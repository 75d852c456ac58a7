"""Start-up and the page cache of an offload artifact's expert file, each run in a memory cgroup
(`memlimit.py`, which charges the page cache to the run) with the artifact's page cache dropped first.

Start-up: open (``verify=True``, the default) + first token, with per-record crc32 (opening reads no
expert) against the same artifact without them (opening hashes the whole expert file, as before the
checksums): seconds, bytes read from disk, records read. Decode: does the expert file double in the
page cache? The expert cache keeping the file's pages (the default) against dropping each record's
pages once read (``page_cache=False``: ``posix_fadvise(DONTNEED)`` + no readahead), at each limit.

    PYTHONPATH=. .venv/bin/python bench/page_cache.py [--limits 2GiB,200MiB,160MiB] [--repeat 3]

The model is a seeded random float32 Mixtral of ~44M parameters (H=384, I=1024, 4 layers, 8 experts,
top-2; 151 MB of experts, all offloaded: ``hot=0``), built and lowered once into ``--cache`` (a few
minutes on 2 cores). Reported per (limit, mode): the group's peak (page cache included), its page
cache at exit, the process's peak RSS, decode tok/s, the cache's loads and bytes read, and whether the
run was OOM-killed. Timings on a shared machine are rough.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memlimit

REPO = Path(__file__).resolve().parents[1]
SHAPE: dict[str, Any] = {
    "hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 6,
    "num_key_value_heads": 2, "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 8192,
    "max_position_embeddings": 1024, "tie_word_embeddings": False,
}

CHILD = """
import json, sys, time
import numpy as np
from moeopt.runtime import OffloadSession, cache_source
from moeopt.runtime.offload_format import OffloadIndex
from moeopt.runtime.manifest import read_manifest
art, frac, keep = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "keep"
prompt, steps = int(sys.argv[4]), int(sys.argv[5])
index = OffloadIndex.from_manifest(read_manifest(art, verify=False))
budget = int(index.cold_bytes() * frac)
t0 = time.perf_counter()
sess = OffloadSession(art, source=cache_source(budget, "lru", page_cache=keep))
opened = time.perf_counter() - t0
ids = np.random.default_rng(0).integers(1, 8192, (1, prompt), dtype=np.int64)
out = sess.generate(ids, steps, stop_tokens=())
c = sess.source.counters
print(json.dumps({"open_s": round(opened, 3), "decode_tok_s": round(out.decode_tokens_per_s, 2),
                  "prefill_s": round(out.prefill_seconds, 3), "budget_bytes": budget,
                  "loads": c.loads, "bytes_read": c.bytes_read, "hits": c.hits, "misses": c.misses,
                  "stall_s": round(c.stall_seconds, 3),
                  "tokens": out.sequences[0, prompt:].tolist(),
                  "vm_hwm_kib": [int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM")][0]}))
sess.close()
"""


def build(cache: Path) -> Path:
    """The random model, lowered with every expert offloaded (float32), built once."""
    out = cache / "offload-f32-hot0"
    if (out / "manifest.json").exists():
        return out
    import torch
    import transformers

    import moeopt
    from moeopt.lower import lower

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(**SHAPE, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    with torch.no_grad():
        model = transformers.MixtralForCausalLM(cfg).float().eval()
        for n, p in model.named_parameters():
            if "gate.weight" in n:  # distinct router preferences, as a trained model has
                p.normal_(0.0, 0.5)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        model.save_pretrained(ckpt)
        ref = REPO / "moeopt" / "assets" / "reference-moe"
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (ref / f).exists():
                shutil.copy2(ref / f, ckpt / f)
        lower(moeopt.load(ckpt), out, experts="offload", hot=0)
    return out


def run(art: Path, limit: int, keep: bool, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryFile("w+") as out:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        res = memlimit.run_limited([sys.executable, "-c", CHILD, str(art), str(args.budget),
                                    "keep" if keep else "drop", str(args.prompt), str(args.steps)],
                                   limit, drop=[art], stdout=out, env=env, timeout=args.timeout)
        out.seek(0)
        text = out.read().strip().splitlines()
    res["mode"] = "keep" if keep else "drop"
    if res["returncode"] == 0 and text:
        res["run"] = json.loads(text[-1])
    return res


STARTUP = """
import json, sys, time
import numpy as np
from moeopt.runtime import OffloadSession, cache_source
from moeopt.runtime.offload_format import OffloadIndex
from moeopt.runtime.manifest import read_manifest
art = sys.argv[1]
def disk() -> int:  # bytes this process has had read from storage so far
    return int([x.split()[1] for x in open("/proc/self/io") if x.startswith("read_bytes")][0])
t0 = time.perf_counter()
index = OffloadIndex.from_manifest(read_manifest(art, verify=False))
sess = OffloadSession(art, source=cache_source(index.cold_bytes() // 2, "lru"))  # verify=True: the default
opened = time.perf_counter() - t0
at_open, disk_at_open = sum(sess.source.store.reads.values()), disk()
out = sess.generate(np.array([[1, 2, 3, 4]], dtype=np.int64), 1, stop_tokens=())
print(json.dumps({"open_s": round(opened, 3), "first_token_s": round(time.perf_counter() - t0, 3),
                  "records_read_at_open": at_open, "disk_read_at_open": disk_at_open,
                  "records_read_by_first_token": sum(sess.source.store.reads.values())}))
sess.close()
"""


def legacy_copy(art: Path) -> Path:
    """The artifact as written before per-record checksums (no crc32 in its index: opening hashes the
    whole expert file), its files hard links to the artifact's, so they share one page cache."""
    old = art.with_name(art.name + "-no-crc")
    if (old / "manifest.json").exists():
        return old
    old.mkdir()
    for f in art.iterdir():
        if f.name != "manifest.json":
            os.link(f, old / f.name)
    manifest = json.loads((art / "manifest.json").read_text())
    for e in manifest["offload"]["experts"]:
        e.pop("crc32", None)
    (old / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return old


def startup(art: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Open + first token from a cold page cache, with per-record checksums and with the whole-file hash."""
    out: dict[str, Any] = {}
    for name, folder in (("crc32 per record", art), ("sha256 of the whole file (no crc32)", legacy_copy(art))):
        runs = []
        for _ in range(args.repeat):
            with tempfile.TemporaryFile("w+") as fh:
                env = {**os.environ, "PYTHONPATH": str(REPO)}
                res = memlimit.run_limited([sys.executable, "-c", STARTUP, str(folder)], memlimit.parse_size("2GiB"),
                                           drop=[art], stdout=fh, env=env, timeout=args.timeout)
                fh.seek(0)
                got = json.loads(fh.read().strip().splitlines()[-1])
            runs.append({**got, "disk_read_bytes": res["block_reads"] * 512, "peak_bytes": res["peak_bytes"],
                         "page_cache_at_exit": res["stat"].get("total_cache")})
        out[name] = {"runs": runs, "median_open_s": float(np.median([r["open_s"] for r in runs])),
                     "median_first_token_s": float(np.median([r["first_token_s"] for r in runs])),
                     "median_disk_read_bytes": float(np.median([r["disk_read_bytes"] for r in runs])),
                     "median_disk_read_at_open": float(np.median([r["disk_read_at_open"] for r in runs]))}
        print(f"start-up, {name}: open {out[name]['median_open_s']:.2f} s (read from disk "
              f"{out[name]['median_disk_read_at_open'] / 2**20:.0f} MiB), first token "
              f"{out[name]['median_first_token_s']:.2f} s (read from disk "
              f"{out[name]['median_disk_read_bytes'] / 2**20:.0f} MiB)", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get(
        "MOEOPT_BENCH_CACHE", Path.home() / ".cache" / "moeopt" / "bench")) / "page-cache-44m")
    ap.add_argument("--limits", default="2GiB,200MiB,160MiB")
    ap.add_argument("--budget", type=float, default=0.5, help="expert cache budget, share of the cold bytes")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each configuration (interleaved); medians")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--parts", default="startup,decode", help="which measurements to run")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "page_cache.json")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a run in progress is killed and its group removed
    art = build(args.cache)
    experts = (art / "experts.bin").stat().st_size
    parts = args.parts.split(",")
    boot = startup(art, args) if "startup" in parts else None
    results = []
    limits = [memlimit.parse_size(x) for x in args.limits.split(",")]
    for rnd in range(args.repeat if "decode" in parts else 0):
        for limit in limits:
            for keep in (True, False):
                r = run(art, limit, keep, args)
                r["round"] = rnd
                results.append(r)
                got = r.get("run", {})
                print(f"limit {limit / 2**20:.0f} MiB, {r['mode']}: peak {r['peak_bytes'] / 2**20:.0f} MiB "
                      f"(page cache at exit {r['stat'].get('total_cache', r['stat'].get('file', 0)) / 2**20:.0f} "
                      f"MiB), RSS {r['max_rss_bytes'] / 2**20:.0f} MiB, {got.get('decode_tok_s')} tok/s, disk "
                      f"{r['block_reads'] * 512 / 2**20:.0f} MiB, exit {r['returncode']}"
                      f"{' OOM' if r['oom_killed'] else ''}", flush=True)
    table = []
    for limit in limits:
        for mode in ("keep", "drop"):
            rs = [r for r in results if r["limit_bytes"] == limit and r["mode"] == mode and "run" in r]
            if not rs:
                continue
            table.append({"limit_bytes": limit, "mode": mode, "runs": len(rs),
                          "median_peak_bytes": float(np.median([r["peak_bytes"] for r in rs])),
                          "median_page_cache_at_exit": float(np.median([r["stat"].get("total_cache", 0) for r in rs])),
                          "median_decode_tok_s": float(np.median([r["run"]["decode_tok_s"] for r in rs])),
                          "median_disk_read_bytes": float(np.median([r["block_reads"] * 512 for r in rs])),
                          "oom_killed": sum(bool(r["oom_killed"]) for r in results
                                            if r["limit_bytes"] == limit and r["mode"] == mode)})
    same = {tuple(r["run"]["tokens"]) for r in results if "run" in r}
    summary = {"artifact": str(art), "experts_bin_bytes": experts, "shape": SHAPE, "budget_share": args.budget,
               "prompt": args.prompt, "steps": args.steps, "repeat": args.repeat, "same_tokens": len(same) <= 1,
               "startup": boot, "decode": table, "runs": results,
               "note": "2 shared x86-64 cores, other engineers' jobs running: timings are rough"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
