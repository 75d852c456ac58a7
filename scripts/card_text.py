"""Fixed prose of the reference model card (the numbers come from ``write_model_card.py``)."""

from __future__ import annotations

from typing import Any

FRONT_MATTER = """---
library_name: transformers
pipeline_tag: text-generation
license: other
tags: [mixtral, moe, moeopt, test-model]
---
"""


def intro(moe: dict[str, Any], apps: list[str]) -> list[str]:
    """Title and summary."""
    s = moe["shape"]
    return [
        "# moeopt reference MoE",
        "",
        f"A small Mixture-of-Experts causal LM ({s['layers']} layers, {s['experts']} experts, top-{s['top_k']}, "
        f"{moe['params']['total'] / 1e6:.1f} M parameters, {moe['params']['active_per_token'] / 1e6:.1f} M active "
        "per token) trained from scratch on CPU on real English text. It is the model every moeopt "
        "compression pass is judged against: perplexity and per-app accuracy before and after a pass. "
        f"It is a genuine Hugging Face `MixtralForCausalLM` checkpoint, so `moeopt.load` and plain "
        f"transformers both read it. Besides news text it was trained on five labelled 'apps' "
        f"({', '.join(apps)}) phrased as prompt + label word, so the foundation model already answers them "
        "without adapters, and its experts see distinct domains.",
        "",
        "It is a test model, far too small and briefly trained to be useful for anything else.",
        "",
    ]


def _stop(run: dict[str, Any]) -> str:
    """``--stop-after`` for a run that a wall-clock deadline ended before its planned steps."""
    return f" --stop-after {run['steps']}" if run.get("truncated") else ""


def reproduce(moe: dict[str, Any], dense: dict[str, Any]) -> list[str]:
    """Commands that rebuild the checkpoint, the baseline and this card."""
    s = moe["shape"]
    steps, warm = moe["steps_planned"], moe["optimizer"]["schedule"].split()[2]
    common = (f"--seed {moe['seed']} --steps {steps} --warmup {warm} --batch {moe['batch']} "
              f"--seq-len {moe['seq_len']} --hidden {s['hidden']} --expert-inter {s['expert_inter']} "
              f"--threads {moe['threads']}")
    return [
        "## Reproduce",
        "",
        "From the repository root with the prepared data in `~/.cache/moeopt/data` "
        "(`python -m moeopt.data.prepare` or equivalent). Training is deterministic on a fixed thread count "
        "(two runs of the same command give identical losses).",
        "",
        "```bash",
        "export PYTHONPATH=.",
        ".venv/bin/python scripts/train_tokenizer.py --out moeopt/assets/reference-moe",
        f".venv/bin/python scripts/train_reference.py --arch moe --out moeopt/assets/reference-moe {common}"
        f"{_stop(moe)}",
        f".venv/bin/python scripts/train_reference.py --arch dense --out ~/.cache/moeopt/dense-baseline {common}"
        f"{_stop(dense)}",
        "for m in moe:moeopt/assets/reference-moe dense:$HOME/.cache/moeopt/dense-baseline; do",
        "  .venv/bin/python scripts/eval_reference.py --model ${m#*:} --out ~/.cache/moeopt/logs/eval-${m%%:*}.json",
        "done",
        ".venv/bin/python scripts/eval_reference.py --unigram moeopt/assets/reference-moe "
        "--out ~/.cache/moeopt/logs/eval-unigram.json",
        ".venv/bin/python scripts/write_model_card.py  # --notes FILE appends run notes",
        ".venv/bin/python scripts/check_reference.py",
        "```",
        "",
    ]


def usage() -> list[str]:
    """How to load it."""
    return [
        "## Use",
        "",
        "```python",
        "import torch",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'path = "moeopt/assets/reference-moe"',
        "tok = AutoTokenizer.from_pretrained(path)",
        "model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)",
        "ids = tok(\"<|endoftext|>Review: A tender, funny film.\\nSentiment:\", return_tensors=\"pt\").input_ids",
        "print(tok.decode(model.generate(ids, max_new_tokens=2, do_sample=False)[0]))",
        "```",
        "",
        "Documents in training start right after `<|endoftext|>`, so prefix prompts with it. The saved "
        "config keeps `output_router_logits=True` (training setting: the load-balancing loss is added "
        "whenever labels are given); set it to False for plain inference.",
        "",
    ]
