"""The shipped reference checkpoint loads with transformers and with moeopt.load, with identical logits."""

from __future__ import annotations

import pytest
import torch

import moeopt
from moeopt.demo import REFERENCE, has_reference

pytestmark = pytest.mark.skipif(not has_reference(), reason="reference checkpoint not shipped")


def test_reference_loads_identically_in_transformers_and_moeopt() -> None:
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(REFERENCE, dtype=torch.float32).eval()
    hf.config.output_router_logits = False  # trained with the aux loss; inference does not want it
    for m in hf.modules():  # transformers' eager experts loop is what the IR reproduces bit for bit
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_experts_implementation"):
            cfg._experts_implementation = "eager"
    tok = Tokenizer.from_file(str(REFERENCE / "tokenizer.json"))
    ids = torch.tensor([tok.encode("Review: a warm, funny and moving film.\nSentiment:").ids])
    with torch.no_grad():
        ref = hf(input_ids=ids, use_cache=False).logits
    model = moeopt.load(REFERENCE)
    assert model.architecture == "mixtral" and len(model.layers) == 4
    assert model.storage_dtype == "float16"
    out = model.logits(ids)
    assert torch.equal(out, ref)
    s = model.stats()
    assert s.total == sum(p.numel() for p in hf.parameters()) and s.expert == 4 * 8 * 3 * 256 * 320
