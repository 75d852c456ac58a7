"""Train the reference model's byte-level BPE tokenizer (vocab 8192) on the training text.

The corpus is the news LM train split plus every app's train split rendered with ``App.render``,
read in a fixed order, so the merges depend only on the prepared data. The output folder loads with
``transformers.AutoTokenizer.from_pretrained`` as a ``PreTrainedTokenizerFast``.

Usage::

    PYTHONPATH=. .venv/bin/python scripts/train_tokenizer.py --out moeopt/assets/reference-moe
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

# The BPE trainer counts words in parallel; one thread keeps the whole run trivially reproducible.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from moeopt.data.apps import APPS, app_split, default_data_root, lm_split

EOT = "<|endoftext|>"
MAX_LENGTH = 512


def training_texts(root: Path) -> Iterator[str]:
    """News train articles, then each app's rendered train examples, in file order."""
    for row in lm_split(root, "news", "train"):
        yield row["text"]
    for name in sorted(APPS):
        app = APPS[name]
        for row in app_split(root, name, "train"):
            yield app.render(row["text"], row["label"])


def build_tokenizer(texts: Iterator[str], vocab_size: int) -> Tokenizer:
    """A GPT-2 style byte-level BPE trained on ``texts`` with ``<|endoftext|>`` as its only special."""
    tok = Tokenizer(models.BPE())
    # No prefix space: " " + label is then the same tokens whether or not it follows a prompt.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        # Every byte is in the vocabulary, so no input is ever unknown.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save(tok: Tokenizer, out: Path) -> PreTrainedTokenizerFast:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        unk_token=EOT,
        pad_token=EOT,
        model_max_length=MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(out))
    # transformers 5 names its class TokenizersBackend; the older alias loads in both 4.x and 5.x.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    # transformers 5 no longer writes this file; older loaders and other tools still read it.
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT, "pad_token": EOT}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return fast


def verify(out: Path, sample: str) -> str:
    """Reload ``out`` with AutoTokenizer, check the round trip and specials; return a summary line."""
    loaded = AutoTokenizer.from_pretrained(str(out))
    if not isinstance(loaded, PreTrainedTokenizerFast):
        raise TypeError(f"AutoTokenizer gave {type(loaded).__name__}, not PreTrainedTokenizerFast")
    ids = loaded(sample)["input_ids"]
    if loaded.decode(ids) != sample:
        raise ValueError("decode(encode(text)) != text")
    eot = loaded.convert_tokens_to_ids(EOT)
    if loaded.eos_token_id != eot or loaded.pad_token_id != eot or loaded.bos_token_id != eot:
        raise ValueError("bos/eos/pad must all be <|endoftext|>")
    sha = hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()[:16]
    return f"{type(loaded).__name__} vocab={len(loaded)} eot={eot} sample={len(ids)} tokens sha={sha}"


def main() -> None:
    """Parse arguments, train, save and verify."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=default_data_root())
    parser.add_argument("--out", type=Path, default=Path("moeopt/assets/reference-moe"))
    parser.add_argument("--vocab-size", type=int, default=8192)
    args = parser.parse_args()
    if not (args.data_root / "READY").exists():
        raise SystemExit(f"{args.data_root} is not ready (no READY marker)")
    tok = build_tokenizer(training_texts(args.data_root), args.vocab_size)
    save(tok, args.out)
    sample = APPS["movie-sentiment"].render("A quietly moving film.", "positive")
    print(verify(args.out, sample))


if __name__ == "__main__":
    main()
