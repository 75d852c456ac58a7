"""Shared fixtures: tiny models of every architecture, saved once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # tests run two workers on two cores


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Mixtral saved as a Hugging Face checkpoint folder."""
    from moeopt.testing import tiny_model

    path = tmp_path_factory.mktemp("ckpt") / "tiny-mixtral"
    tiny_model("mixtral").save_pretrained(path)
    return path


def model_inputs(arch: str, batch: int = 2, seq: int = 11, seed: int = 1) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 97, (batch, seq), generator=torch.Generator().manual_seed(seed))
    kw = {"input_ids": ids}
    if arch == "switch_transformers":
        kw["decoder_input_ids"] = ids[:, : max(2, seq // 2)]
        kw["attention_mask"] = torch.ones_like(ids)
    return kw


FIXTURE_DATA = Path(__file__).parent / "fixtures" / "data"


def fixture_tokenizer(vocab_size: int = 400) -> Tokenizer:
    """A byte-level BPE trained on the data fixtures' news and rendered app texts."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from moeopt.data.apps import APPS, app_split, lm_split

    texts = [r["text"] for r in lm_split(FIXTURE_DATA, "news", "train")]
    for app in APPS.values():
        texts += [app.render(r["text"], r["label"]) for r in app_split(FIXTURE_DATA, app.name, "train")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


@pytest.fixture(scope="session")
def text_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Mixtral with a BPE tokenizer trained on the data fixtures, saved with tokenizer.json."""
    from transformers import MixtralConfig, MixtralForCausalLM

    tok = fixture_tokenizer()
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=512, eos_token_id=0, bos_token_id=0)
    model = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 1.0)
    path = tmp_path_factory.mktemp("textckpt") / "tiny-text-moe"
    model.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    return path
