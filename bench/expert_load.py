"""CPU cost of loading one cold expert of an offload artifact as a prepacked ORT session (`packed_frames`).

A cache load is: read the record into its frame, build the expert's one-node session (ORT prepacks the
weights), and drop the session of the expert the frame held before. On a small model that is CPU work,
not I/O, and it competes with the decode for the cores. Measures, per build recipe, the median of
`--n` loads (read, build + release of the previous session) and of a one-token run:

- ``naive``: what `FramePacker` did before: full-size placeholder initializers in the graph (parsed on
  every build), fresh OrtValues per load, the session on the decode's thread count (`--threads`);
- ``packer-tN``: `FramePacker` as shipped (one-element placeholders, OrtValues reused per frame) with N
  intra-op threads (1 is the default).

Writes expert_load.json.

    .venv/bin/python bench/expert_load.py            # the reference model's offload artifact (bench/offload.py)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runtime import DEFAULT_CACHE, REPO


def naive_builder(packer: Any, fmt: str, threads: int) -> Callable[[list[np.ndarray]], Any]:
    """The pre-change recipe: full-size placeholders, a fresh OrtValue per part, `threads` threads."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    parts = packer.index.formats[fmt].parts
    model = onnx.load_from_string(packer._proto[fmt])
    names = {p.name for p in parts}
    kept = [i for i in model.graph.initializer if i.name not in names]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    for p in parts:
        model.graph.initializer.append(numpy_helper.from_array(np.zeros((1, *p.shape), p.dtype), p.name))
    proto = model.SerializeToString()

    def build(views: list[np.ndarray]) -> Any:
        so = packer._options()
        so.intra_op_num_threads = threads
        values = []
        for p, v in zip(parts, views, strict=True):
            values.append(ort.OrtValue.ortvalue_from_numpy(v.reshape((1, *p.shape))))
            so.add_initializer(p.name, values[-1])
        sess = ort.InferenceSession(proto, so, providers=["CPUExecutionProvider"])
        return sess, values

    return build


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, default=DEFAULT_CACHE / "reference" / "offload-4bit-hot0-top4")
    ap.add_argument("--threads", type=int, default=2, help="the decode's intra-op threads (the naive recipe's)")
    ap.add_argument("--n", type=int, default=400, help="loads per recipe")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "expert_load.json")
    args = ap.parse_args()
    if not (args.artifact / "manifest.json").is_file():
        ap.error(f"no offload artifact at {args.artifact}; run bench/offload.py --build-only --prefetch-top 4 first")
    from moeopt.runtime import read_manifest
    from moeopt.runtime.expert_store import ExpertStore
    from moeopt.runtime.offload_format import OffloadIndex
    from moeopt.runtime.packed_frames import FramePacker, frame_pool, frame_views

    manifest = read_manifest(args.artifact, verify=False)
    index = OffloadIndex.from_manifest(manifest)
    fmt = next(iter(index.formats))
    keys = [k for k, r in sorted(index.experts.items()) if r.format == fmt]
    packers = {f"packer-t{t}": FramePacker(index, args.artifact, manifest.get("target"), t) for t in (1, args.threads)}
    pk1 = packers["packer-t1"]
    recipes: dict[str, tuple[Any, Callable[[list[np.ndarray]], Any]]] = {
        "naive": (None, naive_builder(pk1, fmt, args.threads)),
        **{name: (pk, lambda v, pk=pk: pk.build(fmt, v)) for name, pk in packers.items()}}
    x = np.random.default_rng(0).standard_normal((1, pk1.hidden(fmt)), dtype=np.float32)
    w = np.ones((1, 1), dtype=np.float32)
    out: dict[str, Any] = {}
    frames = {name: frame_views(index.formats[fmt], frame_pool(index.formats[fmt], 1, pk), 0, pk)
              for name, (pk, _) in recipes.items()}  # one frame per recipe, reused by every load (as in a cache)
    held: dict[str, Any] = {}
    fields = ("read_ms", "build_and_release_ms", "one_token_run_ms")
    times: dict[str, dict[str, list[float]]] = {name: {key: [] for key in fields} for name in recipes}
    with ExpertStore(args.artifact, index) as store:
        for i in range(args.n):  # the recipes take turns, so a slow stretch of the machine hits them alike
            layer, slot = keys[i % len(keys)]
            for name, (_, build) in recipes.items():
                t0 = time.perf_counter()
                store.read_into(layer, slot, frames[name])
                t1 = time.perf_counter()
                held[name] = build(frames[name])  # the previous expert's session is released here, as on eviction
                t2 = time.perf_counter()
                sess = held[name][0] if isinstance(held[name], tuple) else held[name].session
                sess.run(["y"], {"x": x, "sw": w})
                t3 = time.perf_counter()
                for key, dt in zip(fields, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                    times[name][key].append(dt)
    for name, parts in times.items():
        out[name] = {key: round(statistics.median(v) * 1e3, 3) for key, v in parts.items()}
        print(name, out[name], flush=True)
    result = {"artifact": str(args.artifact), "format": fmt, "expert_bytes": index.formats[fmt].expert_bytes,
              "loads": args.n, "machine": {"platform": platform.platform()}, "recipes": out}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
