"""Train the reference MoE (Mixtral) or its dense baseline (Mistral) from scratch on the prepared data.

Both arches see the same packed token sequences in the same order for the same seed and step count.
The run is deterministic on a fixed thread count: seeded init, fixed data order, no dropout,
``torch.use_deterministic_algorithms(True)``.

Usage::

    PYTHONPATH=. .venv/bin/python scripts/train_reference.py --arch moe --out moeopt/assets/reference-moe \
        --seed 0 --steps 1000
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import ref_data
import ref_model
import torch
import transformers
from tokenizers import Tokenizer
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from moeopt.data.apps import default_data_root

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def parse_args() -> argparse.Namespace:
    """Command-line options (defaults are the shipped reference run)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=("moe", "dense"), required=True)
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--hidden", type=int, default=ref_model.Shape.hidden)
    p.add_argument("--layers", type=int, default=ref_model.Shape.layers)
    p.add_argument("--heads", type=int, default=ref_model.Shape.heads)
    p.add_argument("--expert-inter", type=int, default=ref_model.Shape.expert_inter)
    p.add_argument("--experts", type=int, default=ref_model.Shape.experts)
    p.add_argument("--top-k", type=int, default=ref_model.Shape.top_k)
    p.add_argument("--apps-share", type=float, default=ref_data.Mixture.apps_share)
    p.add_argument("--app-weight", action="append", default=[], metavar="APP=W",
                   help="relative weight of an app in the apps' share (default 1; repeatable)")
    p.add_argument("--experts-impl", default="grouped_mm", help="transformers experts implementation")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokenizer", type=Path, default=Path("moeopt/assets/reference-moe"))
    p.add_argument("--data-root", type=Path, default=default_data_root())
    p.add_argument("--log", type=Path, default=None, help="full JSON log (default OUT/train_log.json)")
    p.add_argument("--deadline", default=None, help="UTC HH:MM; stop early (marked truncated) if passed")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many steps of the --steps schedule (reproduces a deadline stop)")
    p.add_argument("--init-from", type=Path, default=None, help="start from this checkpoint's weights")
    p.add_argument("--no-save", action="store_true", help="timing runs: train and log only")
    p.add_argument("--label-loss", type=float, default=0.0,
                   help="weight of an extra loss term: mean cross-entropy of the apps' label tokens")
    p.add_argument("--aux", choices=("global", "per-layer"), default="global",
                   help="load-balancing loss over all layers' routing at once (transformers') or per layer")
    p.add_argument("--aux-coef", type=float, default=None, help="load-balancing coefficient (default: config's)")
    return p.parse_args()


def parse_weights(items: list[str]) -> tuple[tuple[str, float], ...]:
    """``APP=W`` options as ``(app, weight)`` pairs."""
    out = []
    for item in items:
        app, sep, w = item.partition("=")
        if not sep:
            raise SystemExit(f"--app-weight wants APP=W, got {item!r}")
        out.append((app, float(w)))
    return tuple(out)


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine decay from ``lr`` to ``lr * min_lr_ratio`` at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    floor = args.lr * args.min_lr_ratio
    return floor + 0.5 * (args.lr - floor) * (1.0 + math.cos(math.pi * t))


def optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW; matrices (incl. embeddings and experts) decay, norm gains do not."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    keep = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


@torch.no_grad()
def evaluate(model: torch.nn.Module, sets: dict[str, torch.Tensor], arch: str) -> dict[str, float]:
    """Mean next-token cross-entropy per validation set, plus ``apps`` (mean over the apps)."""
    model.eval()
    out: dict[str, float] = {}
    extra = {"output_router_logits": False} if arch == "moe" else {}
    for name, seqs in sets.items():
        losses = [model(input_ids=b, labels=b, **extra).loss.item() for b in seqs.split(16)]
        sizes = [len(b) for b in seqs.split(16)]
        out[name] = sum(ls * n for ls, n in zip(losses, sizes, strict=True)) / sum(sizes)
    apps = [v for k, v in out.items() if k != ref_data.NEWS]
    out["apps"] = sum(apps) / len(apps)
    model.train()
    return out


@torch.no_grad()
def routing_by_source(model: torch.nn.Module, sets: dict[str, torch.Tensor]) -> dict[str, list[list[float]]]:
    """Per source, per layer: the share of top-k slots each expert receives on the validation set."""
    model.eval()
    k = model.config.num_experts_per_tok
    n_exp = model.config.num_local_experts
    out: dict[str, list[list[float]]] = {}
    for name, seqs in sets.items():
        counts = torch.zeros(model.config.num_hidden_layers, n_exp)
        for b in seqs.split(16):
            logits = model(input_ids=b, output_router_logits=True).router_logits
            for layer, lg in enumerate(logits):
                idx = lg.topk(k, dim=-1).indices.flatten()
                counts[layer] += torch.bincount(idx, minlength=n_exp).float()
        out[name] = (counts / counts.sum(dim=1, keepdim=True)).round(decimals=4).tolist()
    model.train()
    return out


def staged_loss(
    model: torch.nn.Module, batch: torch.Tensor, is_label: torch.Tensor, args: argparse.Namespace, coef: float
) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """LM cross-entropy + ``label_loss`` x mean CE of the label tokens + ``coef`` x load balance.

    The label term gives each app example's answer the weight of a whole sequence's LM loss, so the
    few label tokens (one per ~100 prompt tokens) are not drowned by the text around them. With
    ``aux=per-layer`` the transformers load-balancing loss is taken per layer and averaged: the
    global form lets every layer keep one hot expert as long as the layers' hot experts differ.
    """
    moe = args.arch == "moe"
    out = model(input_ids=batch, **({"output_router_logits": True} if moe else {}))
    logits = out.logits[:, :-1].float()
    target = batch[:, 1:]
    tok_ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
    loss = tok_ce.mean()
    label_ce = float("nan")
    sel = is_label[:, 1:].flatten()
    if args.label_loss > 0 and bool(sel.any()):
        lab = tok_ce[sel].mean()
        loss = loss + args.label_loss * lab
        label_ce = lab.item()
    aux_t = None
    if moe:
        k, n_exp = model.config.num_experts_per_tok, model.config.num_local_experts
        if args.aux == "per-layer":
            per = [load_balancing_loss_func((lg,), n_exp, k) for lg in out.router_logits]
            aux_t = torch.stack(per).mean()
        else:
            aux_t = load_balancing_loss_func(out.router_logits, n_exp, k)
        loss = loss + coef * aux_t
    return loss, aux_t, label_ce


def past_deadline(deadline: str | None) -> bool:
    """Whether the UTC wall clock is past ``HH:MM`` today."""
    if deadline is None:
        return False
    now = datetime.now(UTC)
    hh, mm = (int(x) for x in deadline.split(":"))
    return (now.hour, now.minute) >= (hh, mm)


def save_checkpoint(model: torch.nn.Module, args: argparse.Namespace) -> None:
    """fp16 safetensors + config + generation config + tokenizer files into ``args.out``."""
    args.out.mkdir(parents=True, exist_ok=True)
    model.half()
    model.config.use_cache = True
    model.generation_config.bos_token_id = ref_model.EOT_ID
    model.generation_config.eos_token_id = ref_model.EOT_ID
    model.generation_config.pad_token_id = ref_model.EOT_ID
    model.save_pretrained(str(args.out), safe_serialization=True)
    if args.tokenizer.resolve() != args.out.resolve():
        for name in TOKENIZER_FILES:
            shutil.copyfile(args.tokenizer / name, args.out / name)


def subsample(curve: list[dict[str, float]], every: int) -> list[dict[str, float]]:
    """Every ``every``-th point plus the last one, for the shipped training.json."""
    pts = curve[::every]
    if curve and pts[-1] is not curve[-1]:
        pts.append(curve[-1])
    return pts


def main() -> None:
    """Build data and model, train, evaluate periodically, save."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    t_start = time.time()
    tok = Tokenizer.from_file(str(args.tokenizer / "tokenizer.json"))
    mix = ref_data.Mixture(apps_share=args.apps_share, app_weights=parse_weights(args.app_weight))
    docs = ref_data.labelled_documents(args.data_root, tok)
    seqs, label_mask, budgets = ref_data.training_sequences(
        docs, args.steps * args.batch, args.seq_len, args.seed, mix)
    val = ref_data.validation_sets(args.data_root, tok, args.seq_len)
    shape = ref_model.Shape(
        vocab=tok.get_vocab_size(), hidden=args.hidden, layers=args.layers, heads=args.heads,
        expert_inter=args.expert_inter, experts=args.experts, top_k=args.top_k,
    )
    torch.manual_seed(args.seed)
    model = ref_model.build(args.arch, shape, args.experts_impl)
    if args.init_from is not None:
        # Continued training (e.g. an app-heavy second stage): start from a saved checkpoint's weights.
        # from_pretrained, not load_state_dict: transformers converts the on-disk per-expert key layout.
        model = type(model).from_pretrained(str(args.init_from), dtype=torch.float32, **(
            {"experts_implementation": args.experts_impl} if args.arch == "moe" else {}))
    model.train()
    opt = optimizer(model, args)
    counts = ref_model.param_counts(model)
    print(f"{args.arch}: {counts}; data {budgets}; setup {time.time() - t_start:.1f}s", flush=True)
    log_path = args.log or args.out / "train_log.json"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log: dict[str, Any] = {
        "arch": args.arch, "args": {k: str(v) for k, v in vars(args).items()},
        "shape": ref_model.shape_dict(shape), "params": counts, "tokens_per_source": budgets,
        "train": [], "valid": [],
    }
    coef = args.aux_coef if args.aux_coef is not None else getattr(model.config, "router_aux_loss_coef", 0.0)
    if args.arch == "moe":
        model.config.router_aux_loss_coef = coef
    t_train = time.time()
    truncated = False
    step = 0
    for step in range(args.steps):
        lr = lr_at(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = seqs[step * args.batch : (step + 1) * args.batch]
        is_label = label_mask[step * args.batch : (step + 1) * args.batch]
        t0 = time.time()
        if args.label_loss == 0.0 and args.aux == "global":
            out = model(input_ids=batch, labels=batch)  # the stage-1 recipe, exactly as first shipped
            loss, aux_t, label_ce = out.loss, getattr(out, "aux_loss", None), float("nan")
        else:
            loss, aux_t, label_ce = staged_loss(model, batch, is_label, args, coef)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        aux = aux_t.item() if aux_t is not None else 0.0
        ce = loss.item() - coef * aux - args.label_loss * (0.0 if math.isnan(label_ce) else label_ce)
        log["train"].append({"step": step + 1, "ce": round(ce, 5), "aux": round(aux, 5), "lr": lr,
                             "label_ce": round(label_ce, 5), "gnorm": round(gnorm, 4),
                             "s": round(time.time() - t0, 3)})
        last = step + 1 == args.steps
        stop = past_deadline(args.deadline) or (args.stop_after is not None and step + 1 >= args.stop_after)
        if (step + 1) % 20 == 0:
            print(f"step {step + 1} ce {ce:.3f} label {label_ce:.3f} aux {aux:.3f} lr {lr:.2e} "
                  f"{(time.time() - t_train) / (step + 1):.2f}s/step", flush=True)
        if (step + 1) % args.eval_every == 0 or last or stop:
            v = evaluate(model, val, args.arch)
            log["valid"].append({"step": step + 1, **{k: round(x, 5) for k, x in v.items()}})
            elapsed = time.time() - t_train
            print(f"step {step + 1}/{args.steps} ce {ce:.3f} aux {aux:.3f} val news {v['news']:.3f} "
                  f"apps {v['apps']:.3f} | {elapsed / (step + 1):.2f}s/step {elapsed / 60:.1f}min", flush=True)
            log_path.write_text(json.dumps(log) + "\n")
            if not last and stop:
                truncated = True
                break
    wall = time.time() - t_train
    steps_done = step + 1
    window = [r["ce"] for r in log["train"][-50:]]
    summary = {
        "arch": args.arch,
        "model_class": type(model).__name__,
        "seed": args.seed,
        "steps": steps_done,
        "steps_planned": args.steps,
        "truncated": truncated,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "tokens_seen": steps_done * args.batch * args.seq_len,
        "tokens_per_source_planned": budgets,
        "apps_share": args.apps_share,
        "app_weights": dict(mix.app_weights),
        "label_loss": args.label_loss,
        "aux": args.aux,
        "aux_coef": coef,
        "init_from": str(args.init_from) if args.init_from is not None else None,
        "optimizer": {"name": "AdamW", "lr": args.lr, "betas": [0.9, 0.95], "weight_decay": args.weight_decay,
                      "schedule": f"linear warmup {args.warmup} steps, cosine to {args.min_lr_ratio} x lr",
                      "grad_clip": args.clip},
        "experts_implementation": args.experts_impl if args.arch == "moe" else None,
        "threads": args.threads,
        "eval_every": args.eval_every,
        "wall_time_s": round(wall, 1),
        "mean_step_s": round(wall / steps_done, 3),
        "final_train_ce_last50": round(sum(window) / len(window), 5),
        "final_valid": log["valid"][-1],
        "shape": ref_model.shape_dict(shape),
        "params": counts,
        "config": model.config.to_diff_dict(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "data_manifest_sha256": _sha(args.data_root / "manifest.json"),
        "finished_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "loss_curve": subsample(log["train"], max(1, steps_done // 100)),
        "valid_curve": log["valid"],
    }
    if args.arch == "moe":
        summary["routing_by_source"] = routing_by_source(model, val)
    prev = args.init_from / "training.json" if args.init_from is not None else None
    if prev is not None and prev.exists():
        # A continued run ships one training.json that also describes the stage it started from.
        summary["previous_stage"] = previous_stage(json.loads(prev.read_text()))
    log["summary"] = {k: v for k, v in summary.items() if k not in ("loss_curve", "valid_curve")}
    log_path.write_text(json.dumps(log) + "\n")
    if not args.no_save:
        save_checkpoint(model, args)
        (args.out / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"done: {steps_done} steps in {wall / 60:.1f} min; valid {log['valid'][-1]}", flush=True)


def previous_stage(run: dict[str, Any]) -> dict[str, Any]:
    """A finished run's summary as the ``previous_stage`` of a run continued from it (no routing table)."""
    return {k: v for k, v in run.items() if k != "routing_by_source"}


def _sha(path: Path) -> str | None:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


if __name__ == "__main__":
    main()
