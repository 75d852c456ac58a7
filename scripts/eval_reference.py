"""Held-out figures of a trained reference checkpoint, and of a unigram baseline, for the model card.

``--model DIR``: perplexity on wiki test and news test and per-app test accuracy through
``moeopt.eval.evaluate``, with the checkpoint upcast to fp32. ``--unigram DIR``: a unigram model with
add-one smoothing fitted on the exact training token stream of the run in DIR (rebuilt from its
``training.json``), scored on the same held-out tokens the harness scores.

Usage::

    PYTHONPATH=. .venv/bin/python scripts/eval_reference.py --model moeopt/assets/reference-moe \
        --out ~/.cache/moeopt/logs/eval-moe.json
    PYTHONPATH=. .venv/bin/python scripts/eval_reference.py --unigram moeopt/assets/reference-moe \
        --out ~/.cache/moeopt/logs/eval-unigram.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import ref_data
import torch
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from moeopt.data.apps import default_data_root, lm_split
from moeopt.eval import evaluate, format_table
from moeopt.eval.perplexity import token_stream

PPL_CORPORA = ("wiki", "news")


def load_model(path: Path) -> PreTrainedModel:
    """The checkpoint in fp32 (weights ship in fp16), MoE experts on the fastest CPU implementation."""
    cfg = AutoConfig.from_pretrained(str(path))
    extra: dict[str, Any] = {}
    if getattr(cfg, "num_local_experts", None):
        extra["experts_implementation"] = "grouped_mm"
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **extra)
    model.config.output_router_logits = False  # logits only; no load-balancing loss at eval
    return model.eval()


def eval_model(args: argparse.Namespace) -> dict[str, Any]:
    """Perplexity and app accuracy of ``args.model`` through the shared harness."""
    model = load_model(args.model)
    tok = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    res = evaluate(model, tok, data_root=args.data_root, ppl=PPL_CORPORA, ppl_tokens=args.ppl_tokens,
                   app_examples=args.app_examples, context=args.context, progress=False)
    print(format_table(res), flush=True)
    return res


def unigram(args: argparse.Namespace) -> dict[str, Any]:
    """Add-one-smoothed unigram perplexity on the harness's held-out token streams."""
    run = json.loads((args.unigram / "training.json").read_text())
    tok = Tokenizer.from_file(str(args.unigram / "tokenizer.json"))
    docs = ref_data.labelled_documents(args.data_root, tok)
    vocab = tok.get_vocab_size()
    counts = torch.zeros(vocab, dtype=torch.float64)
    n_seen = 0
    # Every stage of a continued run (previous_stage chain) contributes the tokens it consumed.
    stage: dict[str, Any] | None = run
    while stage is not None:
        mix = ref_data.Mixture(apps_share=stage["apps_share"],
                               app_weights=tuple(stage.get("app_weights", {}).items()))
        seqs, _, _ = ref_data.training_sequences(docs, stage["steps_planned"] * stage["batch"], stage["seq_len"],
                                                 stage["seed"], mix)
        seen = seqs[: stage["steps"] * stage["batch"]].flatten()  # only what training actually consumed
        counts += torch.bincount(seen, minlength=vocab).double()
        n_seen += int(seen.numel())
        stage = stage.get("previous_stage")
    logp = torch.log((counts + 1.0) / (counts.sum() + vocab))
    out: dict[str, Any] = {"train_tokens": n_seen, "vocab": vocab, "perplexity": {}}
    for corpus in PPL_CORPORA:
        texts = [r["text"] for r in lm_split(args.data_root, corpus, "test")]
        # The harness scores every id of this stream after the first; score exactly those.
        stream = torch.tensor(token_stream(tok, texts, max_tokens=args.ppl_tokens))
        nll = -logp[stream[1:]].mean().item()
        out["perplexity"][corpus] = {"ppl": math.exp(nll), "nll": nll, "tokens": int(stream.numel() - 1)}
        print(f"unigram ppl/{corpus}: {math.exp(nll):.2f} over {stream.numel() - 1} tokens", flush=True)
    return out


def main() -> None:
    """Parse arguments, evaluate, write JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", type=Path, help="checkpoint folder to evaluate")
    which.add_argument("--unigram", type=Path, help="run folder whose training stream fits the unigram")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data-root", type=Path, default=default_data_root())
    p.add_argument("--ppl-tokens", type=int, default=131072, help="held-out tokens scored per corpus")
    p.add_argument("--app-examples", type=int, default=None, help="test rows per app (default: all)")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    res = eval_model(args) if args.model else unigram(args)
    res["eval_args"] = {"ppl_tokens": args.ppl_tokens, "app_examples": args.app_examples,
                        "context": args.context, "wall_s": round(time.time() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
