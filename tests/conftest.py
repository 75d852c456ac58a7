"""Shared fixtures: tiny models of every architecture, saved once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

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
