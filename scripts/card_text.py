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
        "per token) trained from scratch on CPU on real English text, in "
        f"{len(stages(moe))} stage(s). It is the model every moeopt "
        "compression pass is judged against: perplexity and per-app accuracy before and after a pass. "
        f"It is a genuine Hugging Face `MixtralForCausalLM` checkpoint, so `moeopt.load` and plain "
        f"transformers both read it. Besides news text it was trained on five labelled 'apps' "
        f"({', '.join(apps)}) phrased as prompt + label word, so the foundation model already answers them "
        "without adapters, and its experts see distinct domains.",
        "",
        "It is a test model, far too small and briefly trained to be useful for anything else.",
        "",
    ]


def stages(run: dict[str, Any]) -> list[dict[str, Any]]:
    """The training stages of a run, first first (a continued run carries ``previous_stage``)."""
    out = [run]
    while "previous_stage" in out[0]:
        out.insert(0, out[0]["previous_stage"])
    return out


def _stop(run: dict[str, Any]) -> str:
    """``--stop-after`` for a run that a wall-clock deadline ended before its planned steps."""
    return f" --stop-after {run['steps']}" if run.get("truncated") else ""


EVAL_EVERY = 100  # train_reference.py's default --eval-every


def eval_every(run: dict[str, Any]) -> int:
    """A stage's validation period: recorded since it was added to training.json; for older records, the
    first point of the validation curve (a curve of one point, the last step, had the default)."""
    if "eval_every" in run:
        return int(run["eval_every"])
    curve = run.get("valid_curve") or []
    return int(curve[0]["step"]) if len(curve) > 1 else EVAL_EVERY


def _train_cmd(arch: str, out: str, run: dict[str, Any], init: str | None) -> str:
    """The train_reference.py command line of one stage."""
    s = run["shape"]
    o = run["optimizer"]
    warm = o["schedule"].split()[2]
    cmd = (f".venv/bin/python scripts/train_reference.py --arch {arch} --out {out} --seed {run['seed']} "
           f"--steps {run['steps_planned']} --warmup {warm} --lr {o['lr']} --batch {run['batch']} "
           f"--seq-len {run['seq_len']} --hidden {s['hidden']} --expert-inter {s['expert_inter']} "
           f"--apps-share {run['apps_share']} --threads {run['threads']}")
    for app, w in sorted(run.get("app_weights", {}).items()):
        cmd += f" --app-weight {app}={w:g}"
    if run.get("label_loss"):
        cmd += f" --label-loss {run['label_loss']}"
    if run.get("aux", "global") != "global":
        cmd += f" --aux {run['aux']} --aux-coef {run['aux_coef']}"
    every = eval_every(run)
    if every != EVAL_EVERY:  # else the re-run's validation curve misses the card's points
        cmd += f" --eval-every {every}"
    if init is not None:
        cmd += f" --init-from {init}"
    return cmd + _stop(run)


def reproduce(moe: dict[str, Any], dense: dict[str, Any]) -> list[str]:
    """Commands that rebuild the checkpoint (every stage), the baseline and this card."""
    ms, ds = stages(moe), stages(dense)
    n = len(ms)
    cmds = []
    for i, (m, d) in enumerate(zip(ms, ds, strict=True)):
        last = i == n - 1
        mo = "moeopt/assets/reference-moe" if last else f"~/.cache/moeopt/reference-stage{i + 1}"
        do = "~/.cache/moeopt/dense-baseline" if last else f"~/.cache/moeopt/dense-stage{i + 1}"
        mi = None if i == 0 else f"~/.cache/moeopt/reference-stage{i}"
        di = None if i == 0 else f"~/.cache/moeopt/dense-stage{i}"
        cmds += [f"# stage {i + 1}", _train_cmd("moe", mo, m, mi), _train_cmd("dense", do, d, di)]
    return [
        "## Reproduce",
        "",
        "From the repository root with the prepared data in `~/.cache/moeopt/data` "
        "(`moeopt data prepare`). Training is deterministic on a fixed thread count "
        "(two runs of the same command give identical losses).",
        "",
        "```bash",
        "export PYTHONPATH=.",
        ".venv/bin/python scripts/train_tokenizer.py --out moeopt/assets/reference-moe",
        *cmds,
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
