"""Do an offload artifact's expert sources agree? Last-position logits of one 32-token prompt's prefill,
all-resident (`AllResident`) against the expert cache on demand and with 8 x the minimum budget (LFU):
argmax, the top-2 gap and the max |logit diff| between each pair. They must agree within the artifact's
parity tolerance. On the 8x7B-shaped artifact of bench/scale.py (`--label ne4`, accuracy level 4) they
differed by 4.5 (resident vs on demand) and 0.76 (on demand vs LFU) until `packed_frames.probe` ran more
than 2 tokens (ORT read parts it had been judged to copy); they are equal (0) now.

    .venv/bin/python bench/offload_consistency.py ARTIFACT
"""

from __future__ import annotations

import sys

import numpy as np

from moeopt.runtime import open_artifact
from moeopt.runtime.expert_cache import cache_source
from moeopt.runtime.manifest import read_manifest
from moeopt.runtime.offload_format import OffloadIndex
from moeopt.runtime.steppers import DecoderOnlyStepper


def main() -> None:
    art = sys.argv[1]
    manifest = read_manifest(art, verify=False)
    vocab = int(manifest.get("config", {}).get("vocab_size", 32000))
    prompt = np.random.default_rng(0).integers(1, vocab, (1, 32)).astype(np.int64)
    idx = OffloadIndex.from_manifest(manifest)
    out: dict[str, np.ndarray] = {}
    for name, src in (("resident", None), ("on-demand", cache_source(idx.min_budget(), "on-demand")),
                      ("lfu-8x-min", cache_source(idx.min_budget() * 8, "lfu"))):
        sess = open_artifact(art, verify=False, **({} if src is None else {"source": src}))
        stepper = DecoderOnlyStepper(sess._run, prompt, np.ones_like(prompt))
        logits, _ = stepper.prefill(sess.empty_past(1, prompt.shape[1] + 8))
        out[name] = logits[0, -1].astype(np.float64)
        close = getattr(sess, "close", None)
        if close is not None:
            close()
        top = np.sort(out[name])[-2:]
        print(f"{name}: argmax {int(out[name].argmax())}, top-2 gap {top[1] - top[0]:.4g}", flush=True)
    names = list(out)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            print(f"{a} vs {b}: max |logit diff| {np.abs(out[a] - out[b]).max():.4g}")


if __name__ == "__main__":
    main()
