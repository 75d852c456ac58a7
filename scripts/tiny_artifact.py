#!/usr/bin/env python3
"""Regenerate the committed tiny artifacts that the runtime-only install test runs (no torch there).

    PYTHONPATH=. .venv/bin/python scripts/tiny_artifact.py [--out tests/fixtures]

Writes OUT/tiny-artifact (experts resident in model.onnx) and OUT/tiny-artifact-offload (one hot
expert per layer in the graph, the rest in experts.bin), each with the tokenizer and PyTorch's greedy
tokens in parity.npz. The model is a seeded random Mixtral (2 layers, width 32, 4 experts, top-2,
routers drawn from N(0, 1) so that routing varies) with the byte-level BPE (400 ids) that
tests/conftest.py trains on the data fixtures, so `moeopt eval` on tests/fixtures/data tokenizes
without unknown ids. The exporter's per-node stack traces are dropped from the graphs (the manifest is
rehashed): 0.3 MB each, 0.59 MB for both. Needs the compiler (`pip install -e '.[compile,test]'`);
rerun it when the artifact format changes, then commit both folders.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
NAMES = {"tiny-artifact": "resident", "tiny-artifact-offload": "offload"}


def tiny_checkpoint(folder: Path) -> Path:
    """The seeded tiny Mixtral with tokenizer.json, saved as a Hugging Face checkpoint in `folder`."""
    from transformers import MixtralConfig, MixtralForCausalLM

    sys.path.insert(0, str(REPO))
    from tests.conftest import fixture_tokenizer

    tok = fixture_tokenizer()
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=256, tie_word_embeddings=False, eos_token_id=0, bos_token_id=0)
    model = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 1.0)
    model.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def strip_metadata(folder: Path) -> None:
    """Drop the exporter's per-node metadata (PyTorch stack traces: 90% of a tiny graph's bytes) from
    every graph, then rehash the manifest's files. Nothing ORT computes changes; parity.npz still holds."""
    import json

    import onnx

    from moeopt.runtime.manifest import MANIFEST, hash_files

    for path in sorted(folder.glob("*.onnx")):
        graph = onnx.load(str(path), load_external_data=False)  # the .data files stay as they are
        for node in graph.graph.node:
            del node.metadata_props[:]
        onnx.save(graph, str(path))
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"] = hash_files(folder)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import moeopt
    from moeopt.lower import lower

    with tempfile.TemporaryDirectory() as tmp:
        model = moeopt.load(tiny_checkpoint(Path(tmp) / "tiny-text-moe"))
        for name, experts in NAMES.items():
            out = args.out / name
            if out.exists():  # only a folder this script wrote (an artifact) is replaced
                if not (out / "manifest.json").is_file():
                    sys.exit(f"tiny_artifact: {out} exists and is not an artifact; not replacing it")
                shutil.rmtree(out)
            lower(model, out, experts=experts, hot=1)
            strip_metadata(out)
            size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
            print(f"wrote {out} ({experts}, {size / 1e3:.0f} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
