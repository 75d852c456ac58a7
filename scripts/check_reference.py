"""Sanity check of the shipped reference checkpoint: clean load, parameter counts, greedy continuations.

Fails (exit 1) if transformers reports missing, unexpected or mismatched keys.

Usage::

    PYTHONPATH=. .venv/bin/python scripts/check_reference.py [--path moeopt/assets/reference-moe]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import ref_model
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from moeopt.data.apps import APPS

PROMPTS = (
    "The government said on Tuesday that",
    APPS["movie-sentiment"].prompt("A tender, funny and beautifully acted film."),
    APPS["intent"].prompt("Play the latest album by Taylor Swift on Spotify."),
)


class _Collect(logging.Handler):
    """Keeps every transformers warning emitted while loading."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def main() -> None:
    """Load, report, generate."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--path", type=Path, default=Path("moeopt/assets/reference-moe"))
    p.add_argument("--new-tokens", type=int, default=24)
    args = p.parse_args()
    torch.set_num_threads(1)
    collect = _Collect()
    hf_logging.get_logger("transformers").addHandler(collect)
    model, info = AutoModelForCausalLM.from_pretrained(str(args.path), output_loading_info=True)
    tok = AutoTokenizer.from_pretrained(str(args.path))
    bad = {k: v for k, v in info.items() if v}
    key_warnings = [m for m in collect.messages if "missing" in m.lower() or "unexpected" in m.lower()]
    size = (args.path / "model.safetensors").stat().st_size
    print(f"{type(model).__name__} ({model.dtype}), {type(tok).__name__} vocab {len(tok)}; "
          f"model.safetensors {size / 2**20:.2f} MiB")
    for name, n in ref_model.param_counts(model).items():
        print(f"  {name:<22} {n:>12,}")
    print(f"loading info: {info}")
    model = model.float().eval()
    model.config.output_router_logits = False
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        ids = torch.cat([torch.tensor([[tok.eos_token_id]]), ids], dim=1)  # documents start after EOT
        out = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False)
        print(f"--- {prompt!r}\n>>> {tok.decode(out[0, ids.shape[1]:])!r}")
    if bad or key_warnings:
        print(f"FAIL: loading problems {bad} {key_warnings}")
        sys.exit(1)
    print("OK: loads with no missing/unexpected/mismatched keys")


if __name__ == "__main__":
    main()
