"""Lowering checks its own output: the written artifact in onnxruntime against the IR in PyTorch.

`record_parity` stores PyTorch's greedy tokens and logits on a fixed prompt (parity.npz, for any later
runtime); `measure_parity` opens the artifact as a user would (`moeopt.runtime.open_artifact`: `Session`,
`OffloadSession`, or the encoder-decoder path) and returns the max |logit diff| against PyTorch. The
artifact is fed PyTorch's tokens (teacher forcing), so one near-tie in the argmax cannot turn a small
difference into a different sequence. The comparison runs the KV-cache path whenever the graph has one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from moeopt.ir.model import MoEModel
from moeopt.lower.decoder import no_router_outputs
from moeopt.runtime.manifest import PARITY_FILE
from moeopt.runtime.session import Session
from moeopt.runtime.steppers import DecoderOnlyStepper, EncoderDecoderStepper

PROMPT_LEN = 8  # the probe: short, so that checking every lowering costs well under a second on tiny models
STEPS = 8


def _probe(vocab: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (1, length), dtype=np.int64)  # (1, T)


def record_parity(model: MoEModel, path: Path, *, prompt_len: int = PROMPT_LEN, steps: int = STEPS) -> None:
    """PyTorch's greedy tokens and per-step logits on a fixed prompt, saved as .npz.

    Any runtime (scripts/run_artifact.py with only numpy + onnxruntime, on ARM under qemu ...) can then
    check its kernels against the reference without torch.
    """
    prompt = _probe(int(model.config.vocab_size), prompt_len)
    seq = torch.from_numpy(prompt)
    logits = []
    for _ in range(steps):  # full recompute: the reference does not depend on a cache
        with torch.no_grad():
            out = model.hf(input_ids=seq, use_cache=False, **no_router_outputs(model.hf))
        last = out.logits[:, -1].float()  # (1, V)
        logits.append(last.numpy())
        seq = torch.cat([seq, last.argmax(-1, keepdim=True)], dim=1)
    np.savez(path, prompt=prompt, tokens=seq.numpy()[:, prompt_len:], logits=np.stack(logits, axis=1))


def measure_parity(folder: Path, model: MoEModel, *, check_hashes: bool = True) -> float:
    """Max |logit diff| of the artifact in `folder` (its manifest written) against `model` in PyTorch.

    Decoder-only artifacts (resident or offload) are compared with the folder's parity.npz, encoder-decoder
    ones with a PyTorch forward on a probe source and decoder sequence. Every file's sha256 and every
    expert record's crc32 are checked first (`moeopt.runtime.verify`, what opening alone no longer does
    for an offload artifact's experts.bin), so the bytes measured are the bytes the manifest lists.
    `check_hashes=False` skips that check where the caller has just hashed the same files (the lowering:
    a second sha256 of a 4 GB float artifact costs seconds and reads nothing new; the crc32s were
    computed from the same bytes by the writer). Offload artifacts run their segment graphs and, for
    every expert not in a segment, their cold graph fed from experts.bin.

    Raises:
        VerificationError: a written file differs from its manifest entry.
    """
    from moeopt.runtime import AllResident, open_artifact
    from moeopt.runtime.verify import check_artifact

    if check_hashes:
        check_artifact(folder)

    def unpacked(index: Any, path: Path) -> AllResident:  # offload: every cold expert through the artifact's
        return AllResident(index, path, packed=False)  # cold graph, without a prepacked session per expert

    sess = open_artifact(folder, verify=False, source=unpacked)  # checked above when asked
    try:
        if sess.encoder is not None:
            return _seq2seq_diff(sess, model)
        ref = np.load(folder / PARITY_FILE)
        got = _forced_logits(sess, ref["prompt"], ref["tokens"])
        return float(np.abs(got - ref["logits"]).max())
    finally:
        close = getattr(sess, "close", None)  # an offload session's expert source
        if close is not None:
            close()


def _forced_logits(sess: Session, prompt: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """(1, P) prompt, (1, S) tokens fed one by one -> (1, S, V) logits of each next-token prediction."""
    p, s = prompt.shape[1], tokens.shape[1]
    if sess.cache is None:  # no cache: one forward over prompt + all but the last token
        seq = np.concatenate([prompt, tokens[:, :-1]], axis=1)  # (1, P + S - 1)
        return sess.logits(seq)[:, p - 1:]
    # the step function Session.generate drives, fed our tokens (generate would choose its own)
    stepper = DecoderOnlyStepper(sess._run, prompt, np.ones_like(prompt))
    logits, past = stepper.prefill(sess.empty_past(1, p + s))
    out = [logits[:, -1]]
    for i in range(s - 1):
        logits, past = stepper.step(tokens[:, i], past)
        out.append(logits[:, -1])
    return np.stack(out, axis=1)


def _seq2seq_diff(sess: Session, model: MoEModel, src_len: int = PROMPT_LEN, steps: int = STEPS) -> float:
    """Encoder once on a probe source, the decoder stepped through a probe sequence with its cache."""
    assert sess.encoder is not None and sess.encoder_meta is not None
    vocab = int(model.config.vocab_size)
    src = _probe(vocab, src_len)
    mask = np.ones_like(src)
    stepper = EncoderDecoderStepper(sess._run, sess.encoder, sess.encoder_meta, src, mask)
    dec = np.concatenate([stepper.prompt(), _probe(vocab, steps - 1, seed=1)], axis=1)  # (1, S): start + probe
    logits, past = stepper.prefill(sess.empty_past(1))
    got = [logits[:, -1]]
    for i in range(1, steps):
        logits, past = stepper.step(dec[:, i], past)
        got.append(logits[:, -1])
    with torch.no_grad():
        ref = model.hf(input_ids=torch.from_numpy(src), attention_mask=torch.from_numpy(mask),
                       decoder_input_ids=torch.from_numpy(dec), use_cache=False).logits.float()  # (1, S, V)
    return float(np.abs(np.stack(got, axis=1) - ref.numpy()).max())
