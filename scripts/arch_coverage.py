"""Which MoE causal-LM types of the installed transformers moeopt compiles: the README's table.

For every type `moeopt.archs.moe_types()` finds, a tiny random model (`moeopt.archs.tiny_model`) goes
through, each in its own subprocess with a timeout:

1. transformers itself runs it (else `transformers-fails`, left out of the denominator);
2. `moeopt.load` reproduces its logits within 1e-5 (an UnsupportedModelError here is `refused`, with
   its one-line reason);
3. `moeopt.lower.lower` writes an artifact, and the artifact's logits in plain onnxruntime match
   transformers' within 1e-3: `ok`.

Anything else (an exception past load, a parity miss, a crash or a timeout) is `error`: a bug.

Usage::

    PYTHONPATH=. .venv/bin/python scripts/arch_coverage.py [--only afmoe,mixtral] [--jobs 1] [--timeout 600]
        [--json scripts/arch_coverage.json] [--md scripts/arch_coverage.md]

Writes the JSON (one record per type) and a markdown table with the counts; with --only, records of the
other types are kept from the existing JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
LOAD_TOL = 1e-5
ORT_TOL = 1e-3
PROMPT = (1, 8)  # batch, tokens
STATUSES = ("ok", "refused", "error", "transformers-fails")


def _one_line(e: BaseException) -> str:
    text = str(e)
    if "## Exception summary" in text:  # torch.onnx's wrapped errors: the cause, not the advice around it
        text = text.split("## Exception summary", 1)[1].split("(Refer to", 1)[0]
    text = " ".join(text.split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def run_type(model_type: str, work: Path) -> dict[str, Any]:
    """The four stages for one type, in this process; returns its record."""
    import numpy as np
    import onnxruntime as ort
    import torch

    import moeopt
    from moeopt.archs import tiny_model
    from moeopt.errors import UnsupportedModelError
    from moeopt.lower import lower

    torch.set_num_threads(1)
    rec: dict[str, Any] = {"type": model_type}
    ids = torch.randint(3, 97, PROMPT, generator=torch.Generator().manual_seed(0))
    try:
        hf = tiny_model(model_type)
        rec["model_class"] = type(hf).__name__
        with torch.no_grad():
            ref = hf(input_ids=ids).logits.float()
        if not torch.isfinite(ref).all():
            raise ValueError("non-finite logits")
    except Exception as e:
        return {**rec, "status": "transformers-fails", "stage": "transformers", "reason": _one_line(e)}
    try:
        model = moeopt.load(hf)
    except UnsupportedModelError as e:
        return {**rec, "status": "refused", "stage": "load", "reason": str(e)}
    except Exception as e:
        return {**rec, "status": "error", "stage": "load", "reason": _one_line(e)}
    rec["moe_layers"] = len(model.layers)
    rec["adapters"] = model.adapters
    with torch.no_grad():
        got = model.hf(input_ids=ids).logits.float()
    rec["load_diff"] = float((got - ref).abs().max())
    if not rec["load_diff"] <= LOAD_TOL:
        why = f"load logits differ by {rec['load_diff']:.3g}"
        return {**rec, "status": "error", "stage": "load-parity", "reason": why}
    art = work / "artifact"
    try:
        lower(model, art)
    except Exception as e:
        return {**rec, "status": "error", "stage": "lower", "reason": _one_line(e)}
    try:
        man = json.loads((art / "manifest.json").read_text())
        sess = ort.InferenceSession(str(art / "model.onnx"), providers=["CPUExecutionProvider"])
        b, t = PROMPT
        feed: dict[str, Any] = {
            "input_ids": ids.numpy(), "attention_mask": np.ones((b, t), np.int64),
            "position_ids": np.arange(t, dtype=np.int64)[None].repeat(b, 0),
        }
        kv = man["graph"]["kv_cache"]
        for name in man["graph"]["inputs"][3:]:
            kind = "key" if name.endswith("key") else "value"
            feed[name] = np.zeros((b, kv[f"{kind}_heads"], 0, kv[f"{kind}_dim"]), np.float32)
        out = sess.run(["logits"], feed)[0]
    except Exception as e:
        return {**rec, "status": "error", "stage": "ort", "reason": _one_line(e)}
    rec["ort_diff"] = float(np.abs(out - ref.numpy()).max())
    rec["moe_nodes"] = man["graph"]["moe_nodes"]
    if not rec["ort_diff"] <= ORT_TOL:
        why = f"ORT logits differ by {rec['ort_diff']:.3g}"
        return {**rec, "status": "error", "stage": "ort-parity", "reason": why}
    return {**rec, "status": "ok", "stage": "done", "reason": ""}


def _worker(model_type: str, out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix=f"cov-{model_type}-") as d:
        rec = run_type(model_type, Path(d))
    out.write_text(json.dumps(rec))


def _spawn(model_type: str, timeout: int) -> dict[str, Any]:
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "rec.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", model_type, "--worker-out", str(out)]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            rec = {"type": model_type, "status": "error", "stage": "timeout", "reason": f"timed out after {timeout} s"}
        else:
            if out.exists():
                rec = json.loads(out.read_text())
            else:
                tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:] or [f"exit {proc.returncode}"]
                rec = {"type": model_type, "status": "error", "stage": "crash", "reason": tail[0][:300]}
    rec["seconds"] = round(time.monotonic() - start, 1)
    print(f"{model_type:24s} {rec['status']:18s} {rec['seconds']:6.1f}s {rec.get('reason', '')[:110]}", flush=True)
    return rec


def counts(records: list[dict[str, Any]]) -> dict[str, int]:
    c = {s: sum(r["status"] == s for r in records) for s in STATUSES}
    c["found"] = len(records)
    c["runs_in_transformers"] = len(records) - c["transformers-fails"]
    return c


def markdown(records: list[dict[str, Any]], versions: dict[str, str]) -> str:
    c = counts(records)
    share = 100.0 * c["ok"] / max(1, c["runs_in_transformers"])
    lines = [
        f"MoE causal-LM types in transformers {versions['transformers']}: **{c['found']}**; tiny config runs in "
        f"transformers: **{c['runs_in_transformers']}**; compiled with parity (load 1e-5, plain ORT 1e-3): "
        f"**{c['ok']}** ({share:.0f}%); refused at load with a reason: **{c['refused']}**; failing: **{c['error']}**"
        f"; tiny config fails in transformers itself: {c['transformers-fails']}.",
        "",
        "| type | status | reason |",
        "|---|---|---|",
    ]
    for r in sorted(records, key=lambda r: r["type"]):
        reason = str(r.get("reason", "")).replace("|", "\\|")
        if r["status"] == "ok":
            reason = f"load {r['load_diff']:.1e}, ORT {r['ort_diff']:.1e}"
        lines.append(f"| {r['type']} | {r['status']} | {reason} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="comma-separated model types (default: all)")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=900, help="seconds per type")
    ap.add_argument("--json", type=Path, default=HERE / "arch_coverage.json")
    ap.add_argument("--md", type=Path, default=HERE / "arch_coverage.md")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args.worker, args.worker_out)
        return 0
    import transformers

    from moeopt.archs import moe_types

    types = [t.model_type for t in moe_types()]
    print(f"{len(types)} MoE causal-LM types in transformers {transformers.__version__}", flush=True)
    chosen = [t for t in args.only.split(",") if t] or types
    unknown = sorted(set(chosen) - set(types))
    if unknown:
        print(f"not MoE causal-LM types here: {', '.join(unknown)}", file=sys.stderr)
        return 2
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        new = list(pool.map(lambda t: _spawn(t, args.timeout), chosen))
    old = json.loads(args.json.read_text())["types"] if args.only and args.json.exists() else []
    by_type = {r["type"]: r for r in old if r["type"] in types}
    by_type.update({r["type"]: r for r in new})
    records = [by_type[t] for t in types if t in by_type]
    versions = {"transformers": transformers.__version__}
    doc = {"versions": versions, "counts": counts(records), "types": records}
    args.json.write_text(json.dumps(doc, indent=1) + "\n")
    args.md.write_text(markdown(records, versions))
    print(json.dumps(counts(records)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
