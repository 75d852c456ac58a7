"""LoRA tuning with peft on the modules a proxy shares with its foundation.

Targets are the non-expert linear layers (attention projections by default). The routed experts are not
targeted: a proxy's expert slots are merges of several foundation experts (neurons permuted to align),
their count differs from the foundation's, and they are stacked (S, F, H) parameters that MoELayer reads
directly, so neither a peft module adapter nor peft's parameter adapter (whose LoRA is only applied
inside the wrapped module's own forward) has a foundation counterpart to plug into.

Training is deterministic given the seed: batch `s` is a fixed slice of seeded per-epoch permutations,
the learning rate is a function of the step, and checkpoints hold the LoRA weights, the optimizer and
the RNG state, so `--resume` continues exactly where the run stopped.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from moeopt.errors import BadInputError
from moeopt.ir.layer import MoELayer
from moeopt.ir.model import MoEModel
from moeopt.tune.data import Example, LossOn
from moeopt.tune.meta import fingerprint, peak_rss_mib, rss_mib, write_meta

STATE_FILE = "state.pt"
_ATTENTION = ("self_attn", "attn", "attention", "self_attention", "SelfAttention", "EncDecAttention")


@dataclass(frozen=True)
class TuneSettings:
    """LoRA and optimisation settings; everything but `steps` and `save_every` must match on resume."""

    steps: int = 200  # optimizer steps
    batch_size: int = 8  # examples per step
    lr: float = 2e-3  # peak AdamW learning rate (LoRA tolerates far more than full tuning)
    rank: int = 8  # LoRA rank r
    alpha: int = 16  # LoRA scale is alpha / r
    dropout: float = 0.0  # LoRA dropout on the adapted inputs
    targets: str = "attention"  # attention | non-expert | comma-separated module names (q_proj,v_proj)
    loss: LossOn = "label"  # label: the answer tokens only; all: every token after the first
    max_len: int = 256  # tokens per example (long prompts lose their beginning)
    warmup: int = 10  # linear warm-up steps, then cosine to 0.1 x lr
    seed: int = 0  # LoRA init and data order
    save_every: int = 50  # checkpoint period in steps (0: only at the end)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "rank", "max_len"):
            if getattr(self, name) < 1:
                raise BadInputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and self.alpha > 0):
            raise BadInputError(f"--lr and --alpha must be > 0, got {self.lr}, {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise BadInputError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.loss not in ("label", "all"):
            raise BadInputError(f"--loss must be label or all, got '{self.loss}'")
        if self.warmup < 0 or self.save_every < 0:
            raise BadInputError("--warmup and --save-every must be >= 0")
        if self.max_len < 8:
            raise BadInputError(f"--max-len must be >= 8, got {self.max_len}")

    def resumable(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("steps", "save_every")}


@dataclass
class TuneResult:
    """What a tuning run did. `model` is the peft-wrapped host model (LoRA layers live in `MoEModel.hf`)."""

    model: nn.Module
    steps: int
    losses: list[float] = field(default_factory=list)  # per step, from step 0 (resumed runs included)
    seconds: float = 0.0  # training-loop wall time of this invocation
    peak_rss_mib: float = 0.0  # since the process started or the caller's last `reset_peak_rss`
    rss_before_mib: float = 0.0
    targets: list[str] = field(default_factory=list)


def target_modules(model: MoEModel, targets: str) -> list[str]:
    """Full names of the linear layers to adapt; never routed experts, routers or the output head."""
    if targets.strip() == "experts" or "experts" in targets.split("+"):
        raise BadInputError(
            "LoRA on routed experts is not supported: a proxy's expert slots are merges of several foundation "
            "experts with no one-to-one foundation counterpart; adapt attention or non-expert layers"
        )
    head = getattr(model.hf, "get_output_embeddings", lambda: None)()
    moe = {id(m) for layer in model.layers for m in layer.table.modules()}
    candidates = []
    for name, mod in model.hf.named_modules():
        if isinstance(mod, nn.Linear) and mod is not head and id(mod) not in moe:
            candidates.append(name)
    if targets == "attention":
        chosen = [n for n in candidates if any(p in _ATTENTION for p in n.split(".")[:-1])]
    elif targets == "non-expert":
        chosen = candidates
    else:
        wanted = {t.strip() for t in targets.split(",") if t.strip()}
        chosen = [n for n in candidates if n.rsplit(".", 1)[-1] in wanted or n in wanted]
        missing = wanted - {n.rsplit(".", 1)[-1] for n in chosen} - set(chosen)
        if missing:
            names = sorted({n.rsplit(".", 1)[-1] for n in candidates})
            raise BadInputError(f"--targets: no non-expert linear layer named {sorted(missing)[0]}; "
                                f"names: {', '.join(names)}")
    if not chosen:
        raise BadInputError(f"--targets {targets}: no matching linear layers in {type(model.hf).__name__}")
    return chosen


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """Wrap peft calls that wrap a model: peft asks it for the deprecated `is_gradient_checkpointing`, and
    transformers prints a FutureWarning on every such call, which users cannot act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def lr_at(step: int, s: TuneSettings) -> float:
    """Linear warm-up, then cosine decay to 0.1 x lr at the last step (a function of the step: resumable)."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    frac = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(frac, 1.0))))


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Example indices of batch `step`: consecutive slices of seeded per-epoch permutations of range(n)."""
    out: list[int] = []
    start = step * batch_size
    while len(out) < batch_size:
        epoch, pos = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out += perm[pos : pos + batch_size - len(out)].tolist()
    return out


def collate(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T), attention mask (B, T) and target flags (B, T) as in the evaluation."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    target = torch.zeros((len(examples), width), dtype=torch.bool)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = e.ids
        mask[i, : len(e.ids)] = 1
        target[i, e.first : len(e.ids)] = True
    return ids, mask, target


class LossFn:
    """Mean cross-entropy of the target tokens.

    Where the host model's logits are just `head(decoder(x))` (checked once on real data), only the
    target positions go through the output head: the (B, T, V) logits are most of a small model's
    activation memory and the label-only loss needs a handful of positions.
    """

    def __init__(self, hf: nn.Module, probe: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        get_base = getattr(hf, "get_base_model", None)  # a peft wrapper: its LoRA lives in the base model
        hf = get_base() if callable(get_base) else hf
        self.hf = hf
        self.fast = False
        decoder, head = getattr(hf, "model", None), getattr(hf, "get_output_embeddings", lambda: None)()
        if isinstance(decoder, nn.Module) and isinstance(head, nn.Module):
            self.decoder, self.head = decoder, head
            with torch.no_grad():
                ids, mask, _ = probe
                try:
                    fast = self.head(self.decoder(input_ids=ids, attention_mask=mask, use_cache=False)[0])
                    full = hf(input_ids=ids, attention_mask=mask, use_cache=False).logits
                    self.fast = fast.shape == full.shape and bool(torch.allclose(fast, full, atol=1e-5, rtol=1e-4))
                except (TypeError, AttributeError, RuntimeError):
                    self.fast = False

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pick = target[:, 1:]  # (B, T-1): position t predicts token t+1
        if self.fast:
            hidden = self.decoder(input_ids=ids, attention_mask=mask, use_cache=False)[0]  # (B, T, H)
            logits = self.head(hidden[:, :-1][pick])  # (N, V)
        else:
            logits = self.hf(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1][pick]  # (N, V)
        return F.cross_entropy(logits.float(), ids[:, 1:][pick])


def app_loss(hf: nn.Module, examples: Sequence[Example], *, pad_id: int = 0, batch_size: int = 16) -> float:
    """Mean target-token cross-entropy (nats) of `examples` under `hf`, without gradients."""
    total, count = 0.0, 0
    was = hf.training
    hf.eval()
    try:
        with torch.no_grad():
            loss_fn = LossFn(hf, collate(examples[:2], pad_id))
            for i in range(0, len(examples), batch_size):
                ids, mask, target = collate(examples[i : i + batch_size], pad_id)
                n = int(target[:, 1:].sum())
                total += float(loss_fn(ids, mask, target)) * n
                count += n
    finally:
        hf.train(was)
    return total / max(count, 1)


def finetune(
    model: MoEModel,
    examples: Sequence[Example],
    settings: TuneSettings,
    out: Path,
    *,
    pad_id: int = 0,
    resume: bool = False,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
    rss_before_mib: float | None = None,
    checkpoint_dir: Path | None = None,
    on_step: Callable[[int, float], None] | None = None,
    overwrite: bool = False,
) -> TuneResult:
    """Tune LoRA adapters on `model` (usually a proxy) and save them to `out` with moeopt metadata.

    `model.hf` keeps the LoRA layers afterwards (the result's `model` is the peft wrapper). Periodic
    checkpoints go to `checkpoint_dir` (default `OUT.ckpt` beside `out`), and an interrupted run (Ctrl-C,
    an error, or `on_step(step, loss)` raising) saves its finished steps there; they are removed once the
    adapter is saved. `resume=True` continues from the last one, bit for bit as if never stopped.
    An existing non-empty `out` is refused before any step unless `overwrite` (and then only an adapter
    folder moeopt wrote; see `moeopt.outdir`).
    """
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    from moeopt.outdir import atomic_dir, check_out_dir, commit_dir

    check_out_dir(out, overwrite=overwrite)
    rss0 = rss_mib() if rss_before_mib is None else rss_before_mib
    if not examples:
        raise BadInputError("no training examples")
    ckpt = checkpoint_dir or out.parent / f"{out.name}.ckpt"
    if not resume and (ckpt / STATE_FILE).exists():
        raise BadInputError(f"{ckpt} holds an interrupted run: pass --resume to continue it, or delete it")
    if resume and not (ckpt / STATE_FILE).exists():
        raise BadInputError(f"nothing to resume: no checkpoint at {ckpt / STATE_FILE}")
    foundation_fp = fingerprint(model)
    names = target_modules(model, settings.targets)
    torch.manual_seed(settings.seed)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=names, bias="none")
    with quiet_peft():
        peft_model = get_peft_model(model.hf, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    start, losses = 0, []
    data_id = {"examples": len(examples), "tokens": sum(len(e.ids) for e in examples),
               "targets": sum(len(e.ids) - e.first for e in examples)}
    if resume:
        state = torch.load(ckpt / STATE_FILE, weights_only=True)
        same = [state[k] for k in ("settings", "fingerprint", "data")] == [settings.resumable(), foundation_fp, data_id]
        if not same:
            raise BadInputError(f"{ckpt}: the checkpoint was written with other settings, data or model; "
                                "delete it to start over")
        set_peft_model_state_dict(peft_model, state["lora"])
        opt.load_state_dict(state["optim"])
        start, losses = int(state["step"]), list(state["losses"])
    peft_model.eval()  # new LoRA dropout modules start in training mode; the probe must not draw random numbers
    loss_fn = LossFn(model.hf, collate(examples[:2], pad_id))
    if resume:
        torch.set_rng_state(state["rng"])

    def snapshot(done: int) -> dict[str, Any]:
        return {"step": done, "lora": get_peft_model_state_dict(peft_model), "optim": opt.state_dict(),
                "rng": torch.get_rng_state(), "losses": losses[:done], "settings": settings.resumable(),
                "fingerprint": foundation_fp, "data": data_id}

    peft_model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(start, settings.steps), desc="finetune", unit="step", disable=not progress,
               initial=start, total=settings.steps)
    done = start
    try:
        for step in bar:
            idx = batch_indices(len(examples), settings.batch_size, step, settings.seed)
            batch = collate([examples[i] for i in idx], pad_id)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, settings)
            loss = loss_fn(*batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.item())
            done = step + 1
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if settings.save_every and done % settings.save_every == 0 and done < settings.steps:
                _save_state(ckpt, snapshot(done))
            if on_step is not None:
                on_step(done, losses[-1])
    except BaseException:  # Ctrl-C or a failure: keep the finished steps for --resume
        if done > start:
            _save_state(ckpt, snapshot(done))
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    peft_model.eval()
    peak = peak_rss_mib()
    result = TuneResult(peft_model, settings.steps, losses, seconds, peak, rss0, names)
    tmp = atomic_dir(out, overwrite=overwrite)
    try:
        peft_model.save_pretrained(str(tmp))
        write_meta(tmp, {
            **(meta or {}),
            "foundation": {**(meta or {}).get("foundation", {}), "fingerprint": foundation_fp},
            "settings": asdict(settings),
            "targets": names,
            "train": {
                "steps": settings.steps, "resumed_at": start if resume else None, "examples": len(examples),
                "loss_first": _mean(losses[:_window(losses)]), "loss_last": _mean(losses[-_window(losses):]),
                "losses": losses,
                "seconds": round(seconds, 2), "peak_rss_mib": round(peak, 1), "rss_before_mib": round(rss0, 1),
                "trainable_params": sum(p.numel() for p in params),
            },
        })
        commit_dir(tmp, out, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (ckpt / STATE_FILE).unlink(missing_ok=True)  # only what moeopt wrote there: a user's folder of that name stays
    with contextlib.suppress(OSError):
        ckpt.rmdir()
    return result


def _save_state(folder: Path, state: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{STATE_FILE}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, folder / STATE_FILE)


def _window(losses: Sequence[float]) -> int:
    """Steps averaged for the first / last loss: 10, or a quarter of a short run."""
    return max(1, min(10, len(losses) // 4))


def _mean(xs: Sequence[float]) -> float | None:
    return round(sum(xs) / len(xs), 5) if xs else None


def moe_layers(hf: nn.Module) -> list[MoELayer]:
    """The MoELayers of a host model in index order (after a deep copy or a peft merge)."""
    return sorted((m for m in hf.modules() if isinstance(m, MoELayer)), key=lambda m: m.index)
