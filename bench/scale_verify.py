"""The parity check of a streamed artifact compiled with `lower{verify=false}` (`bench/scale.py --no-verify`).

Runs what `moeopt convert --stream` runs when verify is on (`moeopt.stream.compile._parity`): the artifact's
greedy tokens on the parity probe in onnxruntime, then one streamed teacher-forced PyTorch forward over
prompt + tokens, each layer's experts re-read and re-quantized one at a time from the checkpoint as the
work folder's layer states say; the same sweep carries the simulated forward of the tolerance's error
model (`moeopt.stream.simulate`). Writes parity.npz into the artifact and records it in the manifest
(``parity``, ``parity_measured``, ``parity_tolerance`` and ``parity_rule`` as the measured rule gives them,
``verified``, the file's sha256):

    .venv/bin/python bench/scale_verify.py CHECKPOINT ARTIFACT WORK_DIR
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path


def main() -> None:
    import torch

    from moeopt.ir.table import SlotInfo
    from moeopt.lower.onnx_quant import QuantSettings
    from moeopt.runtime.manifest import MANIFEST, PARITY_FILE
    from moeopt.stream.compile import _parity, linear_stand_ins
    from moeopt.stream.plan import stream_plan
    from moeopt.stream.reader import LazyCheckpoint
    from moeopt.stream.simulate import Simulation
    from moeopt.stream.skeleton import StreamSkeleton

    torch.set_num_threads(1)
    src, art, work = (Path(a) for a in sys.argv[1:4])
    manifest = json.loads((art / MANIFEST).read_text())
    plan = stream_plan(manifest["pipeline"], art)
    sk = StreamSkeleton(src, LazyCheckpoint(src))
    states = [json.loads(p.read_text()) for p in sorted(work.glob("layer-*.json"))]
    for st in states:
        sk.drop_experts(st["layer"], [SlotInfo.from_dict(d) for d in st["slots"]], st["quantized"])
    linear_stand_ins(sk, plan)  # quantize{non-experts=N}: the linears' formats, as the tolerance reads them
    sim = Simulation(sk.model, QuantSettings(int(plan.lower.opts["accuracy-level"]), exact=False))
    t0 = time.perf_counter()
    measured, simulated = _parity(sk, states, plan, art, int(manifest["offload"]["file_bytes"]), print, sim)
    manifest["parity_tolerance"], manifest["parity_rule"] = sim.rule(simulated)
    data = (art / PARITY_FILE).read_bytes()
    manifest["files"][PARITY_FILE] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    manifest["parity"] = PARITY_FILE
    manifest["parity_measured"] = measured
    manifest["verified"] = bool(measured <= manifest["parity_tolerance"])
    (art / MANIFEST).write_text(json.dumps(manifest, indent=1))
    print(json.dumps({"parity_measured": measured, "parity_tolerance": manifest["parity_tolerance"],
                      "parity_rule": manifest["parity_rule"], "verified": manifest["verified"],
                      "seconds": round(time.perf_counter() - t0, 1),
                      "bytes_read": sk.reader.bytes_read}))


if __name__ == "__main__":
    main()
