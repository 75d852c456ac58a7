"""The ONNX Runtime half of the streamed parity check, in a process of its own.

`compile._parity` first decodes the parity probe greedily with the artifact just written (ONNX Runtime,
experts through a small cache), then sweeps the checkpoint with PyTorch, layer by layer, on the prompt
plus those tokens. Run in the compiling process, the first half left about 4.7 GiB resident under the
second (ONNX Runtime's and the expert cache's allocations that neither `gc` nor ``malloc_trim`` gave
back; measured on the 8x7B-shaped checkpoint of `bench/scale.py`: 7.59 GiB peak for the check against
the 6.26 GiB of the layer sweep). A child process returns all of it to the OS when it exits, so the
compile's peak is the larger of the two halves, not their sum. The child imports no torch.

    python -m moeopt.stream.probe_run ARTIFACT OUT.npz VOCAB EXPERT_BYTES
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from moeopt.lower.parity import PROMPT_LEN, STEPS, _probe

RESIDENT_VERIFY_MAX = 1 << 30  # experts.bin up to this size is read whole for the parity run; above, the
# smallest LRU cache (one layer's top_k experts): 16 tokens re-read experts either way (random probe tokens
# route all over), and each frame holds ORT's packed copy of an expert (100 MB on the 8x7B shape)


def greedy_probe(folder: Path, vocab: int, expert_bytes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The artifact's greedy decode of the parity probe: (prompt (1, T), tokens (1, S), logits (1, S, V))."""
    from moeopt.runtime import AllResident, open_artifact
    from moeopt.runtime.expert_cache import ExpertCache
    from moeopt.runtime.steppers import DecoderOnlyStepper

    prompt = _probe(vocab, PROMPT_LEN)

    def source(index: Any, path: Path) -> Any:
        if expert_bytes <= RESIDENT_VERIFY_MAX:
            return AllResident(index, path, packed=False)
        return ExpertCache(path, index, index.min_budget())

    sess = open_artifact(folder, verify=False, source=source)
    try:
        stepper = DecoderOnlyStepper(sess._run, prompt, np.ones_like(prompt))
        logits, past = stepper.prefill(sess.empty_past(1, PROMPT_LEN + STEPS))
        got, toks = [logits[:, -1]], []
        for s in range(STEPS):
            tok = got[-1].argmax(-1).astype(np.int64)
            toks.append(tok)
            if s + 1 < STEPS:
                logits, past = stepper.step(tok, past)
                got.append(logits[:, -1])
    finally:
        close = getattr(sess, "close", None)
        if close is not None:
            close()
    return prompt, np.stack(toks, axis=1), np.stack(got, axis=1)


def run_in_child(folder: Path, vocab: int, expert_bytes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`greedy_probe` in a fresh Python process (this interpreter, this moeopt), its result read back.

    Raises:
        RuntimeError: the child failed; its last lines of stderr are in the message.
    """
    out = folder / ".probe-run.npz"
    root = str(Path(__file__).resolve().parents[2])  # the folder holding the moeopt package
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    try:
        done = subprocess.run([sys.executable, "-m", "moeopt.stream.probe_run", str(folder), str(out), str(vocab),
                               str(expert_bytes)], env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = " | ".join((done.stderr or "").strip().splitlines()[-3:])
            raise RuntimeError(f"the parity probe's ONNX Runtime run failed (exit {done.returncode}): {tail}")
        with np.load(out) as z:
            return z["prompt"], z["tokens"], z["logits"]
    finally:
        out.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    folder, out, vocab, expert_bytes = argv if argv is not None else sys.argv[1:]
    prompt, tokens, logits = greedy_probe(Path(folder), int(vocab), int(expert_bytes))
    np.savez(out, prompt=prompt, tokens=tokens, logits=logits)


if __name__ == "__main__":
    main()
