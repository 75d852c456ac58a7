"""Checkpoints larger than memory: synthetic Mixtral-shaped checkpoints and what `moeopt` costs on them.

Generates (once, cached under ~/.cache/moeopt/bench/scale/ or $MOEOPT_BENCH_CACHE/scale) random
Mixtral checkpoints from a fixed seed, in the layout Mixtral ships (per-expert w1/w2/w3 tensors,
bfloat16 safetensors shards, one shard per decoder layer, model.safetensors.index.json):

- `1b`: 14 layers, H=1024, I=2816, 8 experts, GQA 16/8, vocab 8192: 1.03 B parameters, 2.0 GB.
- `8x7b`: Mixtral-8x7B's layer shape (H=4096, I=14336, 8 experts, GQA 32/8, vocab 32000) with
  `--layers N` decoder layers (default 10: 29 GB, more than this machine's 24 GiB of RAM).

Shards are written tensor by tensor (the safetensors header is computed from the shapes first), so the
generator holds one tensor, never a shard or the model. Then each measured command runs in its own
process under /usr/bin/time -v (peak RSS = maximum resident set size, wall time; RSS over time sampled
with psutil), and one JSON + PNG per model and label goes to bench/results/scale/ (steps of one label
accumulate; `after` prints its ratio to `before`):

    .venv/bin/python bench/scale.py --model 1b --label after --steps inspect,load,verify
    .venv/bin/python bench/scale.py --model 1b --label before --code /path/to/older/tree --steps inspect,load
    .venv/bin/python bench/scale.py --model 8x7b --layers 10 --label after --steps inspect,compile
    .venv/bin/python bench/scale.py --model 8x7b --layers 10 --generate-only

`--label` names the code state measured (e.g. `before` on the code preceding lazy weights). The `compile`
step runs the streamed compile (`moeopt convert --stream`, issue 32 items 1-3) of COMPILE_PIPELINE on the
checkpoint, with a work folder beside the artifact (a killed run started again resumes at its next layer;
calibration: seeded random token ids, the synthetic checkpoint has no tokenizer) into
CACHE/out/<checkpoint>-offload-q4, and records its per-layer seconds and bytes read (`--report`) beside
the peak RSS. The pipeline is the issue's (importance, prune to 75% of the experts, merge, 4-bit, offload):
of 8 experts per layer 6 are hot, 1 is moderate (matched to a hot expert and merged into it, its neurons
aligned by linear assignment) and 1 is cold (removed).

`--pipeline TEXT` compiles another pipeline instead: the whole pipeline text, where `{calib}` stands for
the calibration file and `{verify}` for true/false (`--no-verify`); its artifact and work folder are
CACHE/out/<checkpoint>-offload-<8 hex digits of the text's sha256> (a work folder is tied to its pipeline),
and the result JSON records the text. E.g. every linear 4-bit, no prune:

    .venv/bin/python bench/scale.py --model 8x7b --layers 10 --label nonexperts4 --steps compile --pipeline \
      'importance{calib={calib},seq-len=128,max-tokens=512},quantize{method=uniform,bits=4,non-experts=4,lm-head=true},lower{experts=offload,hot=0,verify={verify}}'
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "moeopt" / "assets" / "reference-moe"
CACHE = Path(os.environ.get("MOEOPT_BENCH_CACHE", Path.home() / ".cache" / "moeopt" / "bench")) / "scale"
RESULTS = REPO / "bench" / "results" / "scale"
SEED = 0
DISK_MARGIN = 4 * 2**30  # left free beside a new checkpoint (other jobs share the disk)

SHAPES: dict[str, dict[str, Any]] = {
    "1b": {
        "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 14, "num_attention_heads": 16,
        "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 8192,
    },
    "8x7b": {
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 10, "num_attention_heads": 32,
        "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000,
    },
}
COMPILE_PIPELINE = ("importance{calib={calib},seq-len=128,max-tokens=512},prune{keep=0.75,cold=0.125},match,merge,"
                    "quantize{method=uniform,bits=4},lower{experts=offload,hot=0,verify={verify}}")
CALIB_SEQS = 4  # x 128 tokens of seeded random ids


def calibration_file(vocab: int, seed: int = SEED) -> Path:
    """Seeded random token ids as calibration JSONL ({"ids": [...]} records): the checkpoint has no tokenizer."""
    import random

    path = CACHE / f"calib-ids-v{vocab}-seed{seed}.jsonl"
    if not path.exists():
        rng = random.Random(seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(json.dumps({"ids": [rng.randrange(vocab) for _ in range(128)]})
                                  for _ in range(CALIB_SEQS)) + "\n")
    return path


def pipeline_text(template: str, calib: Path, verify: bool) -> str:
    """`template` with its `{calib}` and `{verify}` placeholders filled (plain replacement: the pass
    options' own braces stay as they are)."""
    return template.replace("{calib}", str(calib)).replace("{verify}", str(verify).lower())


def compile_out(folder: Path, template: str = COMPILE_PIPELINE) -> Path:
    """The artifact folder of `template` compiled from `folder` (its work folder and report sit beside it)."""
    tag = "q4" if template == COMPILE_PIPELINE else hashlib.sha256(template.encode()).hexdigest()[:8]
    return CACHE / "out" / f"{folder.name}-offload-{tag}"


def compile_report(folder: Path, template: str = COMPILE_PIPELINE) -> Path:
    out = compile_out(folder, template)
    return out.with_name(out.name + ".report.json")


def config_for(name: str, layers: int | None) -> dict[str, Any]:
    """The transformers config.json of a shape (bfloat16, untied embeddings, Mixtral defaults)."""
    shape = dict(SHAPES[name])
    if layers is not None:
        shape["num_hidden_layers"] = layers
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "dtype": "bfloat16",
        "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}, "tie_word_embeddings": False,
        "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "output_router_logits": False,
        "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0, "sliding_window": None,
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True, **shape,
    }


def layer_tensors(cfg: dict[str, Any], i: int) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of decoder layer i's tensors, in Mixtral's checkpoint layout."""
    h, inter, e = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"]
    head = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head
    p = f"model.layers.{i}."
    out: list[tuple[str, tuple[int, ...]]] = [
        (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
        (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
        (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
        (p + "block_sparse_moe.gate.weight", (e, h)),
    ]
    for j in range(e):
        q = f"{p}block_sparse_moe.experts.{j}."
        out += [(q + "w1.weight", (inter, h)), (q + "w2.weight", (h, inter)), (q + "w3.weight", (inter, h))]
    return out


def shard_plan(cfg: dict[str, Any]) -> list[list[tuple[str, tuple[int, ...]]]]:
    """One shard per decoder layer, then one with the embeddings, the final norm and the lm_head."""
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    shards = [layer_tensors(cfg, i) for i in range(cfg["num_hidden_layers"])]
    shards.append([("model.embed_tokens.weight", (v, h)), ("model.norm.weight", (h,)), ("lm_head.weight", (v, h))])
    return shards


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def checkpoint_bytes(cfg: dict[str, Any]) -> int:
    return sum(2 * _numel(s) for shard in shard_plan(cfg) for _, s in shard)


def _values(name: str, shape: tuple[int, ...], seed: int) -> Any:
    """bf16 values of one tensor, from a generator seeded by (seed, name): independent of write order."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + sum(ord(c) * 31**k for k, c in enumerate(name)) % 2**31)
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    std = 0.5 if name.endswith("block_sparse_moe.gate.weight") else 0.02  # distinct router preferences
    return (torch.randn(shape, generator=g) * std).to(torch.bfloat16)


def write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], seed: int) -> int:
    """Write one safetensors file tensor by tensor (header from the shapes first); returns its bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        n = 2 * _numel(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    import torch

    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in tensors:
            t = _values(name, shape, seed)
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            del t
    tmp.replace(path)
    return 8 + len(raw) + offset


def generate(name: str, layers: int | None, seed: int = SEED) -> Path:
    """The cached checkpoint folder of a shape; written shard by shard, complete only once `done` exists."""
    cfg = config_for(name, layers)
    folder = CACHE / f"{name}-L{cfg['num_hidden_layers']}-seed{seed}"
    if (folder / "done").exists():
        return folder
    need = checkpoint_bytes(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    have = sum(f.stat().st_size for f in folder.glob("*.safetensors"))  # a resumed generation counts its shards
    free = shutil.disk_usage(folder).free
    if need - have + DISK_MARGIN > free:
        sys.exit(f"scale: {folder} needs {(need - have) / 1e9:.1f} GB more, only {free / 1e9:.1f} GB free "
                 f"(keeping {DISK_MARGIN / 2**30:.0f} GiB margin); free disk or use fewer --layers")
    plan = shard_plan(cfg)
    total = len(plan)
    weight_map: dict[str, str] = {}
    t0 = time.perf_counter()
    for k, tensors in enumerate(plan):
        fname = f"model-{k + 1:05d}-of-{total:05d}.safetensors"
        if not (folder / fname).exists():  # a finished shard of an interrupted run is kept
            write_shard(folder / fname, tensors, seed)
            print(f"scale: wrote {fname} ({time.perf_counter() - t0:.0f} s)", flush=True)
        weight_map.update({n: fname for n, _ in tensors})
    index = {"metadata": {"total_size": sum(2 * _numel(s) for shard in plan for _, s in shard)},
             "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    if name == "1b":
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (REFERENCE / f).exists():
                shutil.copy2(REFERENCE / f, folder / f)
    (folder / "done").write_text(json.dumps({"seed": seed, "bytes": need, "s": round(time.perf_counter() - t0, 1)}))
    return folder


def measured(cmd: list[str], code: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `cmd` in its own process under /usr/bin/time -v: peak RSS (GiB), wall time, exit code.

    It runs in the measured source tree `code` (`python -c` puts the working directory first on
    sys.path, ahead of PYTHONPATH).
    """
    import psutil

    t0 = time.perf_counter()
    series: list[tuple[float, float]] = []
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(["/usr/bin/time", "-v", *cmd], stdout=out, stderr=err, text=True, env=env, cwd=code)
        proc = psutil.Process(p.pid)
        while p.poll() is None:  # RSS over time of the measured process (the child of /usr/bin/time)
            try:
                rss = sum(c.memory_info().rss for c in proc.children(recursive=True))
                series.append((round(time.perf_counter() - t0, 2), round(rss / 2**30, 3)))
            except psutil.Error:
                pass
            time.sleep(0.25)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    errs = [ln for ln in stderr.splitlines() if ln.startswith("moeopt: error")]
    step = max(1, len(series) // 400)
    return {"cmd": " ".join(cmd), "rc": p.returncode, "wall_s": round(wall, 1),
            "peak_rss_gib": round(int(m.group(1)) / 2**20, 3) if m else None,
            # /usr/bin/time's figure is the largest single process; a step with a child process (the
            # parity check's ONNX Runtime run) is held to the sum over the tree, sampled every 0.25 s
            "peak_tree_rss_gib": max((g for _, g in series), default=None),
            "error": errs[0] if errs else None, "stdout_head": stdout.splitlines()[:3],
            "rss_gib_over_time": series[::step]}


def plot(result: dict[str, Any], before: dict[str, Any] | None, out: Path) -> None:
    """RSS over time of each measured step (dashed: the `before` code), one PNG per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for runs, style, tag in ((result["runs"], "-", result["label"]), ((before or {}).get("runs", {}), "--", "before")):
        for step, r in runs.items():
            pts = r.get("rss_gib_over_time") or []
            if pts:
                label = f"{step} ({tag}): peak {r['peak_rss_gib']} GiB"
                ax.plot([t for t, _ in pts], [g for _, g in pts], style, label=label)
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS (GiB)")
    ax.set_title(f"{result['model']}, {result['layers']} layers, {result['checkpoint_bytes'] / 1e9:.1f} GB bf16")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _moeopt() -> list[str]:
    return [sys.executable, "-c", "from moeopt.cli import main; main()"]


def iter_commands(folder: Path, steps: list[str], verify: bool = True,
                  template: str = COMPILE_PIPELINE) -> Iterator[tuple[str, list[str]]]:
    if "inspect" in steps:
        yield "inspect", [*_moeopt(), "inspect", str(folder)]
    if "load" in steps:  # the whole-model `moeopt.load` (weights, per-layer checks, cache check)
        yield "load", [sys.executable, "-c", "import sys, moeopt; m = moeopt.load(sys.argv[1]); "
                       "print(m.summary().splitlines()[1])", str(folder)]
    if "verify" in steps:
        yield "verify", [*_moeopt(), "convert", str(folder), "--passes", "verify", "-o",
                         str(CACHE / "out" / f"{folder.name}-verify"), "--overwrite"]
    if "compile" in steps:  # the streamed compile: one decoder layer at a time
        vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
        pipeline = pipeline_text(template, calibration_file(vocab), verify)
        out, report = compile_out(folder, template), compile_report(folder, template)
        report.unlink(missing_ok=True)
        yield "compile", [*_moeopt(), "convert", str(folder), "--passes", pipeline, "-o", str(out),
                          "--stream", "--overwrite", "--report", str(report),
                          "--work-dir", str(out.with_name(out.name + ".work"))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (8x7b default 10, 1b: 14)")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--label", default="after", help="code state measured: before / after")
    ap.add_argument("--steps", default="inspect", help="comma-separated: inspect, load, verify, compile")
    ap.add_argument("--generate-only", action="store_true")
    ap.add_argument("--no-verify", action="store_true", help="compile: skip the artifact's parity check (the "
                    "streamed PyTorch reference re-reads and re-quantizes every layer: about half the time again)")
    ap.add_argument("--pipeline", default=COMPILE_PIPELINE, help="compile: the whole pipeline text, {calib} "
                    "and {verify} standing for the calibration file and true/false (default: %(default)s)")
    ap.add_argument("--code", type=Path, default=REPO, help="moeopt source tree measured (PYTHONPATH)")
    args = ap.parse_args()
    if args.no_verify and "{verify}" not in args.pipeline:
        ap.error("--no-verify: the --pipeline text has no {verify} placeholder (write lower{...,verify={verify}})")
    layers = args.layers if args.layers is not None else (10 if args.model == "8x7b" else None)
    folder = generate(args.model, layers, args.seed)
    print(f"scale: checkpoint {folder}")
    if args.generate_only:
        return
    steps = [s for s in args.steps.split(",") if s]
    cfg = json.loads((folder / "config.json").read_text())
    ckpt_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    emb_bytes = 2 * cfg["vocab_size"] * cfg["hidden_size"]
    result: dict[str, Any] = {
        "model": args.model, "checkpoint": str(folder), "label": args.label, "checkpoint_bytes": ckpt_bytes,
        "layers": cfg["num_hidden_layers"], "embedding_bytes_bf16": emb_bytes, "host": platform.node(),
        "cpus": os.cpu_count(), "load_avg_before": os.getloadavg(),
        "note": "2 shared CPU cores, other jobs running: timings are rough",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": {},
    }
    whole_fp32 = 2 * ckpt_bytes  # what a whole-model float32 load holds, before any copy
    if args.label == "before" and whole_fp32 > 0.8 * _ram_bytes() and any(s in steps for s in ("inspect", "load")):
        sys.exit(f"scale: the code before lazy weights loads the whole model in float32 for inspect/load "
                 f"({whole_fp32 / 2**30:.0f} GiB at least, {_ram_bytes() / 2**30:.0f} GiB of RAM here): not run, it "
                 "would be killed for memory and take other jobs with it")
    env = {**os.environ, "PYTHONPATH": str(args.code), "OMP_NUM_THREADS": "1"}
    result["code"] = str(args.code)
    if "compile" in steps:
        result["pipeline"] = args.pipeline
    for label, cmd in iter_commands(folder, steps, verify=not args.no_verify, template=args.pipeline):
        print(f"scale: {label} ...", flush=True)
        result["runs"][label] = r = measured(cmd, args.code, env)
        print(f"scale: {label}: rc {r['rc']}, peak RSS {r['peak_rss_gib']} GiB (process tree, sampled: "
              f"{r['peak_tree_rss_gib']} GiB), {r['wall_s']} s", flush=True)
        if label == "compile":
            r.update(compile_summary(folder, cfg, args.pipeline))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{args.model}-L{cfg['num_hidden_layers']}-{args.label}.json"
    if out.exists():  # steps measured in separate invocations of one label accumulate
        old = json.loads(out.read_text())
        result["runs"] = {**old.get("runs", {}), **result["runs"]}
    out.write_text(json.dumps(result, indent=1))
    print(f"scale: wrote {out}")
    before = out.with_name(out.name.replace(f"-{args.label}.json", "-before.json"))
    before_result = json.loads(before.read_text()) if args.label != "before" and before.exists() else None
    plot(json.loads(out.read_text()), before_result, out.with_suffix(".png"))
    if before_result is not None:
        old_runs = before_result.get("runs", {})
        for step, r in result["runs"].items():
            b = old_runs.get(step, {})
            if r.get("peak_rss_gib") and b.get("peak_rss_gib"):
                print(f"scale: {step}: peak RSS {b['peak_rss_gib']} -> {r['peak_rss_gib']} GiB "
                      f"({b['peak_rss_gib'] / r['peak_rss_gib']:.1f}x less), wall {b['wall_s']} -> {r['wall_s']} s")


def compile_summary(folder: Path, cfg: dict[str, Any], template: str = COMPILE_PIPELINE) -> dict[str, Any]:
    """The streamed compile's own report (per-layer seconds, bytes read), its artifact, and the targets:
    peak RSS <= 2 x one decoder layer's bf16 bytes + 2 GB; per-layer time flat within 20%."""
    layer_bytes = 2 * sum(_numel(s) for _, s in layer_tensors(cfg, 0))
    art = compile_out(folder, template)
    out: dict[str, Any] = {"streamed": True, "artifact": str(art), "pipeline": template,
                           "layer_bytes_bf16": layer_bytes, "rss_target_gib": round((2 * layer_bytes + 2e9) / 2**30, 2)}
    try:
        rep = json.loads(compile_report(folder, template).read_text())
    except (OSError, ValueError):
        return out
    out["report"] = rep
    work = art.with_name(art.name + ".work")
    layers = []  # every layer's own record (a resumed run's report lists only the layers it computed)
    for f in sorted(work.glob("layer-*.json")):
        st = json.loads(f.read_text())
        layers.append({"layer": st["layer"], "seconds": st["seconds"], "cpu_seconds": st.get("cpu_seconds"),
                       "bytes_read": st["bytes_read"]})
    out["layers"] = layers or rep["layers"]
    # wall seconds, and the process's CPU seconds (all threads), which other jobs on a shared machine do
    # not stretch; the target compares the first layer with the last (and the spread says max / min)
    for key in ("seconds", "cpu_seconds"):
        secs = [lay[key] for lay in out["layers"] if lay.get(key) is not None]
        if secs:
            out[f"layer_{key}_min_max"] = [min(secs), max(secs)]
            out[f"layer_{key}_spread"] = round(max(secs) / min(secs) - 1, 3)
            out[f"layer_{key}_first_last"] = round(max(secs[0], secs[-1]) / min(secs[0], secs[-1]) - 1, 3)
    if art.exists():
        out["artifact_bytes"] = sum(f.stat().st_size for f in art.iterdir() if f.is_file())
    return out


def _ram_bytes() -> int:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


if __name__ == "__main__":
    main()
