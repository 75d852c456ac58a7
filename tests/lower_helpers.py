"""Shared by test_lower.py and test_runtime.py: artifacts built once per test session, and references.

Export takes tens of seconds, so each artifact is built once and shared by every xdist worker through
a folder under the session's common temp root, guarded by a file lock (pytest-xdist's recipe).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from filelock import FileLock

import moeopt
from moeopt.ir.model import MoEModel
from moeopt.ir.table import SlotInfo
from moeopt.lower import lower
from moeopt.lower.decoder import no_router_outputs
from moeopt.testing import tiny_model

VOCAB = 97


def tiny(arch: str) -> MoEModel:
    return moeopt.load(tiny_model(arch))


def compressed_qwen3() -> MoEModel:
    """qwen3_moe with experts pruned and merged in both layers (edits as test_routing_semantics does)."""
    model = tiny("qwen3_moe")
    t0, t1 = model.layers[0].table, model.layers[1].table
    # layer 0: expert 5 pruned, 1 merged into 0 (slot = mean of the two), others kept
    w_in0 = torch.stack([(t0.w_in[0] + t0.w_in[1]) / 2, t0.w_in[2], t0.w_in[3], t0.w_in[4]])
    w_out0 = torch.stack([(t0.w_out[0] + t0.w_out[1]) / 2, t0.w_out[2], t0.w_out[3], t0.w_out[4]])
    t0.set_slots(w_in0, w_out0, [SlotInfo((0, 1)), SlotInfo((2,)), SlotInfo((3,)), SlotInfo((4,))])
    # layer 1: three experts in one slot, 4 pruned
    t1.set_slots(t1.w_in[[2, 0, 5]], t1.w_out[[2, 0, 5]], [SlotInfo((2, 1, 3)), SlotInfo((0,)), SlotInfo((5,))])
    moeopt.verify(model)
    return model


def reference_like_mixtral() -> torch.nn.Module:
    """Tiny Mixtral configured as scripts/ref_model.py trains the reference model: tied embeddings,
    output_router_logits=True left in the config, one id for bos/eos/pad."""
    import transformers

    from moeopt.testing import tiny_config

    cfg = tiny_config("mixtral")
    cfg.tie_word_embeddings, cfg.output_router_logits, cfg.router_aux_loss_coef = True, True, 0.01
    cfg.bos_token_id = cfg.eos_token_id = cfg.pad_token_id = 3
    torch.manual_seed(0)
    hf = transformers.MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "gate.weight" in n:
                p.normal_(0.0, 0.5)
    return hf


def with_tokenizer(ckpt: Path) -> Path:
    """Write a word-level tokenizer.json (one token per id) into a checkpoint folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(ckpt / "tokenizer.json"))
    return ckpt


BUILDERS = {
    "compressed_qwen3": compressed_qwen3,
}


def artifact(name: str, factory: pytest.TempPathFactory) -> Path:
    """The artifact of tiny `name` (an arch, or a key of BUILDERS), lowered once per session."""
    # Under xdist every worker's basetemp sits in one session folder; alone, basetemp is that folder
    # (its parent would be shared with earlier sessions and hand back stale artifacts).
    base = factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "moeopt-artifacts"
    root.mkdir(exist_ok=True)
    out = root / name
    with FileLock(str(out) + ".lock"):
        if not (out / "manifest.json").exists():
            if name == "mixtral":  # configured like the reference model, from a folder with a tokenizer
                ckpt = root / "mixtral-ckpt"
                reference_like_mixtral().save_pretrained(ckpt)
                model = moeopt.load(with_tokenizer(ckpt))
            else:
                model = BUILDERS[name]() if name in BUILDERS else tiny(name)
            lower(model, out, pipeline="test")
    return out


def source_model(name: str, art: Path) -> MoEModel:
    """The PyTorch model an artifact was lowered from (rebuilt: tiny models are seeded)."""
    if name == "mixtral":
        return moeopt.load(art.parent / "mixtral-ckpt")
    return BUILDERS[name]() if name in BUILDERS else tiny(name)


def left_padded_batch(lengths: list[int], seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(B, max_len) ids and mask, each row a random prompt of its length, padded on the left."""
    rng = np.random.default_rng(seed)
    t = max(lengths)
    ids = np.zeros((len(lengths), t), dtype=np.int64)
    mask = np.zeros((len(lengths), t), dtype=np.int64)
    for r, n in enumerate(lengths):
        ids[r, t - n:] = rng.integers(0, VOCAB, n)
        mask[r, t - n:] = 1
    return ids, mask


def torch_greedy(model: MoEModel, ids: np.ndarray, mask: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy decoding by full recompute in PyTorch (no cache): (B, steps) tokens, (B, steps, V) logits."""
    seq, m = torch.from_numpy(ids), torch.from_numpy(mask)
    tokens, logits = [], []
    for _ in range(steps):
        pos = (m.cumsum(-1) - 1).masked_fill(m == 0, 1)
        with torch.no_grad():
            kw = no_router_outputs(model.hf)
            out = model.hf(input_ids=seq, attention_mask=m, position_ids=pos, use_cache=False, **kw)
            last = out.logits[:, -1]
        nxt = last.argmax(-1, keepdim=True)
        tokens.append(nxt)
        logits.append(last)
        seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    return torch.cat(tokens, 1).numpy(), torch.stack(logits, 1).numpy()


def manifest(art: Path) -> dict:
    return json.loads((art / "manifest.json").read_text())  # type: ignore[no-any-return]
