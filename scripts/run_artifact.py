#!/usr/bin/env python3
"""Run a moeopt artifact with nothing but onnxruntime and numpy (no moeopt, no torch).

    python scripts/run_artifact.py ARTIFACT [--ids 5,17,3] [--max-new-tokens 32]   # greedy decode
    python scripts/run_artifact.py ARTIFACT --parity                               # check vs PyTorch

--parity decodes the prompt stored in the artifact's parity.npz (recorded from PyTorch when the artifact
was lowered) with the KV cache and compares tokens (identical) and logits (max abs diff <= --tol, by
default the tolerance the manifest states: 1e-3 for exact kernels, 0.25 where activations are int8).
Exit status 0 = pass, 1 = mismatch, 2 = bad artifact. The manifest's sha256 sums are checked first.
This file is the reference for using an artifact from any ORT binding: read manifest.json, open
model.onnx with manifest["target"] settings, feed input_ids / attention_mask / position_ids and the
past key/values, read logits and present key/values.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def load_manifest(folder: Path) -> dict:
    manifest = json.loads((folder / "manifest.json").read_text())
    for rel, entry in manifest["files"].items():
        p = folder / rel
        h = hashlib.sha256()
        with p.open("rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        if p.stat().st_size != entry["bytes"] or h.hexdigest() != entry["sha256"]:
            raise ValueError(f"{p}: corrupted or truncated (does not match manifest.json)")
    return manifest


def open_session(folder: Path, manifest: dict, threads: int | None) -> ort.InferenceSession:
    t = manifest["target"]
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[t["graph_optimization_level"]]
    so.intra_op_num_threads = t["intra_op_threads"] if threads is None else threads
    so.inter_op_num_threads = t["inter_op_threads"]
    for key, value in t["config"].items():
        so.add_session_config_entry(key, value)
    return ort.InferenceSession(str(folder / manifest["graph"]["file"]), so, providers=t["providers"])


def greedy(
    sess: ort.InferenceSession, manifest: dict, prompt: np.ndarray, steps: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """(B, T) prompt -> (B, steps) tokens, (B, steps, V) logits, decode tokens/s; KV cache carried."""
    g = manifest["graph"]
    c = g["kv_cache"]
    b = prompt.shape[0]
    past = []
    for _ in range(c["num_layers"]):
        past += [np.zeros((b, c["key_heads"], 0, c["key_dim"]), np.float32),
                 np.zeros((b, c["value_heads"], 0, c["value_dim"]), np.float32)]
    ids, mask = prompt, np.ones_like(prompt)
    pos = np.broadcast_to(np.arange(prompt.shape[1]), prompt.shape).astype(np.int64)
    tokens, logits = [], []
    t0 = None
    for step in range(steps):
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        feeds.update(zip(g["inputs"][3:], past, strict=True))
        out = sess.run(g["outputs"], feeds)
        last, past = out[0][:, -1], out[1:]
        nxt = last.argmax(-1).astype(np.int64)
        tokens.append(nxt)
        logits.append(last)
        if step == 0:
            t0 = time.perf_counter()  # decode speed excludes the prefill
        ids, pos = nxt[:, None], pos[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((b, 1), np.int64)], axis=1)
    dt = time.perf_counter() - t0 if t0 is not None else 0.0
    tps = (steps - 1) * b / dt if dt > 0 else 0.0
    return np.stack(tokens, 1), np.stack(logits, 1), tps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--ids", default="", help="comma-separated prompt token ids (default: the parity prompt)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--parity", action="store_true", help="compare with the PyTorch reference in parity.npz")
    ap.add_argument("--tol", type=float, default=None,
                    help="max |logit diff| (default: the manifest's parity_tolerance, else 1e-3)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    try:
        manifest = load_manifest(args.artifact)
        sess = open_session(args.artifact, manifest, args.threads)
    except (OSError, ValueError, KeyError) as e:
        print(f"run_artifact: error: {e}", file=sys.stderr)
        return 2
    if manifest.get("encoder"):
        print("run_artifact: error: encoder-decoder artifacts (encoder.onnx) run with moeopt.runtime.Session",
              file=sys.stderr)
        return 2
    ref = np.load(args.artifact / manifest["parity"]) if manifest.get("parity") else None
    if args.parity:
        if ref is None:
            print("run_artifact: error: this artifact has no parity.npz", file=sys.stderr)
            return 2
        if args.tol is None:
            args.tol = float(manifest.get("parity_tolerance", 1e-3))
        tokens, logits, tps = greedy(sess, manifest, ref["prompt"], ref["tokens"].shape[1])
        diff = float(np.abs(logits - ref["logits"]).max())
        same = bool((tokens == ref["tokens"]).all())
        verdict = "identical" if same else "DIFFER"
        print(f"parity: tokens {verdict}, max |logit diff| {diff:.3g} (tol {args.tol:g}), "
              f"onnxruntime {ort.__version__} on {sys.platform}")
        return 0 if same and diff <= args.tol else 1
    if args.ids:
        prompt = np.array([[int(t) for t in args.ids.split(",")]], dtype=np.int64)
    elif ref is not None:
        prompt = ref["prompt"]
    else:
        print("run_artifact: error: give --ids", file=sys.stderr)
        return 2
    tokens, _, tps = greedy(sess, manifest, prompt, args.max_new_tokens)
    print(" ".join(str(int(t)) for t in tokens[0]))
    print(f"{tps:.1f} tokens/s (decode)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
