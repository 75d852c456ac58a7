"""Experiment (not a moeopt feature): keep a LiteMoE proxy in step with its foundation while tuning.

Every EVERY LoRA steps the adapter being tuned on the proxy is copied into the foundation, the
foundation's MoE layer inputs and outputs are recorded again on the app's calibration tokens (8,192, as
`extract` records them), and the proxy's kept experts are refitted to them (`refit`'s `fit_layer`, 300
Adam steps a layer). EVERY=0 is plain `extract` + `finetune`. It writes the proxy-tuned accuracy and the
foundation + proxy adapter (LiteMoE) accuracy on the app's test split, and the layer errors per re-sync.

    PYTHONPATH=. .venv/bin/python bench/apps_resync.py SEED EVERY OUT.json [STEPS] [APP]
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

import moeopt
from moeopt.data.apps import default_data_root
from moeopt.demo import REFERENCE
from moeopt.eval import evaluate
from moeopt.eval.model_io import as_tokenizer, separator_ids
from moeopt.passes.calib import load_tokenizer
from moeopt.passes.importance import calibration_sets
from moeopt.passes.refit import fit_layer, is_exact, record_io, relative_error
from moeopt.tune import extract, plug
from moeopt.tune.data import build_examples, read_rows
from moeopt.tune.lora import TuneSettings, finetune, target_modules

DATA = default_data_root()  # $MOEOPT_DATA or ~/.cache/moeopt/data, as bench/apps.py reads it


def main() -> None:
    seed, every, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else 1000
    app = sys.argv[5] if len(sys.argv) > 5 else "health-source"
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="moeopt-resync-"))
    try:
        run(seed, every, out, steps, app, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(seed: int, every: int, out: Path, steps: int, app: str, work: Path) -> None:
    base = moeopt.load(moeopt.load(REFERENCE).save(work / "f32", dtype=torch.float32))  # as bench/apps.py tunes it
    tok = load_tokenizer(base)
    rows, _ = read_rows(f"app:{app}", data_root=DATA)
    examples = build_examples(rows, tok, loss="label", max_len=256,
                              vocab_size=int(base.config.get_text_config().vocab_size))
    pad = separator_ids(as_tokenizer(tok))[0]
    proxy = copy.deepcopy(base)
    extract(proxy, f"app:{app}", keep=0.3, data_root=DATA)
    foundation = copy.deepcopy(base)
    batches = [b for cs in calibration_sets(base, (f"app:{app}",), 128, 8192, DATA) for b in cs.batches]
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=target_modules(foundation, "attention"),
                     bias="none")
    get_peft_model(foundation.hf, cfg)  # the foundation's LoRA layers, filled from the proxy's at each re-sync
    fparams = dict(foundation.hf.named_parameters())
    log: list[dict[str, object]] = []

    def resync(step: int, loss: float) -> None:
        if not every or step % every or step == steps:
            return
        t0 = time.perf_counter()
        with torch.no_grad():
            for n, p in proxy.hf.named_parameters():
                if "lora_" in n:
                    fparams[n].copy_(p)
        io = record_io(foundation, batches)
        errs = []
        for i, layer in enumerate(proxy.layers):
            if is_exact(layer):
                continue
            before = relative_error(layer, io.inputs[i], io.outputs[i])
            fit_layer(layer, io.inputs[i], io.outputs[i], steps=300, lr=1e-3, batch=1024, seed=step + i)
            errs.append([round(before, 4), round(relative_error(layer, io.inputs[i], io.outputs[i]), 4)])
        log.append({"step": step, "loss": round(loss, 4), "layer_error_before_after": errs,
                    "seconds": round(time.perf_counter() - t0, 1)})
        print(log[-1], flush=True)

    settings = TuneSettings(steps=steps, batch_size=8, lr=2e-3, rank=8, alpha=16, seed=seed, save_every=0)
    adapter = work / "adapter"
    t0 = time.perf_counter()
    finetune(proxy, examples, settings, adapter, pad_id=pad, progress=False, on_step=resync)
    seconds = time.perf_counter() - t0

    def accuracy(m: moeopt.MoEModel) -> float:
        return float(evaluate(m.hf, tok, data_root=DATA, ppl=[], tasks=[app], progress=False)["apps"][app]["accuracy"])

    result = {"seed": seed, "every": every, "steps": steps, "app": app, "proxy_tuned": accuracy(proxy),
              "litemoe": accuracy(plug(copy.deepcopy(base), adapter)), "seconds": round(seconds, 1), "log": log}
    print(result, flush=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
