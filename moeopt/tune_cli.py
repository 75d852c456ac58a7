"""`moeopt extract`, `moeopt finetune` and `moeopt plug` (registered in moeopt.cli).

Outside the `moeopt.tune` package on purpose: `moeopt --help` imports this module to register the
commands, and importing anything inside the package runs its `__init__`, which imports torch; the
runtime-only install has none. The commands import `moeopt.tune` when they run.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer

from moeopt.errors import BadInputError
from moeopt.outdir import OVERWRITE_HELP, check_out_dir

_DTYPES = ("auto", "float32", "float16", "bfloat16")
AppData = Annotated[str, typer.Option("--app", help="app data: a JSONL file or app:NAME[:SPLIT] (prepared data)")]
DataRoot = Annotated[Path | None, typer.Option(help="data root for app:NAME (default: prepared data)")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help=OVERWRITE_HELP)]


def _dtype(name: str, default: str | None) -> object:
    import torch

    if name not in _DTYPES:
        raise BadInputError(f"--dtype must be one of {', '.join(_DTYPES)}, got '{name}'")
    key = default if name == "auto" else name
    return None if key is None else getattr(torch, key)


def extract_cmd(
    model: Annotated[str, typer.Argument(help="foundation checkpoint folder (Hugging Face or moeopt)")],
    app: AppData,
    out: Annotated[Path, typer.Option("-o", "--out", help="proxy checkpoint folder to write")],
    keep: Annotated[float, typer.Option(help="share of each layer's routed experts kept as hot slots")] = 0.3,
    cold: Annotated[float, typer.Option(help="share removed outright (-1: half of 1 - keep, rest merged)")] = -1.0,
    calib_tokens: Annotated[int, typer.Option(help="calibration tokens for the importance statistics")] = 16384,
    data: DataRoot = None,
    dtype: Annotated[str, typer.Option(help="storage dtype; float32 keeps merged experts exact")] = "float32",
    rank: Annotated[str, typer.Option(help="expert ranking: loss (the app loss's rise when an expert is masked) "
                                           "or freq (LiteMoE's routing frequency)")] = "loss",
    refit: Annotated[bool, typer.Option("--refit/--no-refit", help="fit the kept experts to the foundation's layer "
                                        "outputs on the app's data after the merge")] = True,
    overwrite: Overwrite = False,
) -> None:
    """Extract an app's LiteMoE proxy: importance on its data, prune + ILP match + aligned merge, refit."""
    import moeopt
    from moeopt.tune.extract import calib_spec, check_keep, check_rank, extract

    check_keep(keep)
    check_rank(rank)
    check_out_dir(out, overwrite=overwrite)
    spec = calib_spec(app)
    save_dtype = _dtype(dtype, None)
    m = moeopt.load(model)
    before = m.stats()
    report = extract(m, spec, keep=keep, cold=None if cold < 0 else cold, calib_tokens=calib_tokens, data_root=data,
                     rank=rank, refit=refit)
    after = m.stats()
    m.save(out, dtype=save_dtype, overwrite=overwrite)  # type: ignore[arg-type]
    print(f"proxy: routed-expert params {after.expert:,} of {before.expert:,} ({after.expert / before.expert:.1%}), "
          f"total {after.total:,} of {before.total:,}")
    print(f"wrote {out} ({report.pipeline})")


def finetune_cmd(
    proxy: Annotated[str, typer.Argument(help="proxy (or any foundation) checkpoint folder with tokenizer.json")],
    app: AppData,
    out: Annotated[Path, typer.Option("-o", "--out", help="adapter folder to write")],
    task: Annotated[str | None, typer.Option(help="app of file records that carry no 'app' field")] = None,
    data: DataRoot = None,
    steps: Annotated[int, typer.Option(help="optimizer steps")] = 200,
    batch_size: Annotated[int, typer.Option(help="examples per step")] = 8,
    lr: Annotated[float, typer.Option(help="peak learning rate")] = 2e-3,
    rank: Annotated[int, typer.Option(help="LoRA rank")] = 8,
    alpha: Annotated[int, typer.Option(help="LoRA alpha (scale alpha / rank)")] = 16,
    dropout: Annotated[float, typer.Option(help="LoRA dropout")] = 0.0,
    targets: Annotated[str, typer.Option(help="attention, non-expert, or module names (q_proj,v_proj)")] = "attention",
    loss: Annotated[str, typer.Option(help="label: answer tokens only; all: every token")] = "label",
    max_len: Annotated[int, typer.Option(help="tokens per example")] = 256,
    max_examples: Annotated[int, typer.Option(help="use at most this many records (0: all)")] = 0,
    warmup: Annotated[int, typer.Option(help="warm-up steps")] = 10,
    save_every: Annotated[int, typer.Option(help="checkpoint every N steps (0: never)")] = 50,
    seed: Annotated[int, typer.Option(help="LoRA init and data-order seed")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted run from OUT.ckpt")] = False,
    threads: Annotated[int, typer.Option(help="torch threads (0: torch's default)")] = 0,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="show a progress bar")] = True,
    overwrite: Overwrite = False,
) -> None:
    """Tune LoRA adapters on a proxy with the app's labelled examples; reports peak memory."""
    import torch

    from moeopt.tune.data import build_examples, read_rows
    from moeopt.tune.lora import TuneSettings, finetune
    from moeopt.tune.meta import peak_rss_mib, read_meta, reset_peak_rss, rss_mib

    settings = TuneSettings(steps=steps, batch_size=batch_size, lr=lr, rank=rank, alpha=alpha, dropout=dropout,
                            targets=targets, loss=loss, max_len=max_len, warmup=warmup, seed=seed,  # type: ignore[arg-type]
                            save_every=save_every)
    if max_examples < 0:
        raise BadInputError(f"--max-examples must be >= 0, got {max_examples}")
    check_out_dir(out, overwrite=overwrite)
    rows, name = read_rows(app, data_root=data, task=task)
    rows = rows[:max_examples] if max_examples else rows
    if threads:
        torch.set_num_threads(threads)
    import moeopt
    from moeopt.eval.model_io import as_tokenizer, separator_ids
    from moeopt.passes.calib import load_tokenizer

    _import_for(proxy)
    reset_peak_rss()  # count from here: the model, the data and the tuning, not the imports
    rss0 = rss_mib()
    m = moeopt.load(proxy)
    tok = load_tokenizer(m)
    examples = build_examples(rows, tok, loss=settings.loss, max_len=max_len,
                              vocab_size=int(m.config.get_text_config().vocab_size))
    pad = separator_ids(as_tokenizer(tok))[0] if tok is not None else 0
    load_peak = peak_rss_mib()
    reset_peak_rss()
    meta = {
        "app": app, "data": name,
        "foundation": {"source": m.source},
        "tuned_on": {"path": str(proxy), "history": m.history, "expert_params": m.stats().expert,
                     "params": m.stats().total},
        "load_peak_rss_mib": round(load_peak, 1),
    }
    res = finetune(m, examples, settings, out, pad_id=pad, resume=resume, progress=progress, meta=meta,
                   rss_before_mib=rss0, overwrite=overwrite)
    train = read_meta(out)["train"]
    peak = max(load_peak, res.peak_rss_mib)
    print(f"tuned {len(res.targets)} modules for {res.steps} steps on {len(examples)} examples of {name}: "
          f"loss {train['loss_first']:.4f} -> {train['loss_last']:.4f} ({res.seconds:.1f}s)")
    print(f"peak RSS {peak:.0f} MiB: {peak - rss0:.0f} MiB above the process before loading the model "
          f"({res.peak_rss_mib - rss0:.0f} MiB while tuning, {load_peak - rss0:.0f} MiB while loading)")
    print(f"wrote {out}")


def _import_for(path: str) -> None:
    """Import the code that loading and tuning `path` needs, so that the baseline RSS counts code, not data."""
    import accelerate  # noqa: F401
    from peft import LoraConfig, get_peft_model  # noqa: F401
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    import moeopt.ir.checkpoint  # noqa: F401

    with contextlib.suppress(OSError, ValueError, KeyError):  # loading reports a bad folder with its own message
        MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(path))]


def plug_cmd(
    model: Annotated[str, typer.Argument(help="foundation checkpoint folder")],
    adapter: Annotated[Path, typer.Argument(help="adapter folder written by `moeopt finetune`")],
    out: Annotated[Path, typer.Option("-o", "--out", help="checkpoint folder of the plugged model")],
    dtype: Annotated[str, typer.Option(help="storage dtype: auto (as the foundation), float32, ...")] = "auto",
    artifact: Annotated[Path | None, typer.Option(help="also lower the plugged model to this artifact")] = None,
    target: Annotated[str, typer.Option(help="target profile of --artifact: x86_64 or arm64")] = "x86_64",
    overwrite: Overwrite = False,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="--artifact: run it in onnxruntime "
                                         "against PyTorch before it is renamed into place")] = True,
) -> None:
    """Merge an app's adapter into its foundation and save the model (and, with --artifact, lower it)."""
    import moeopt
    from moeopt.passes import PassContext
    from moeopt.passes.lower import Lower
    from moeopt.tune.meta import read_meta
    from moeopt.tune.plug import plug

    read_meta(adapter)  # a bad adapter folder or target costs nothing
    lower = None if artifact is None else Lower(out=artifact, target=target, overwrite=overwrite, verify=verify)
    save_dtype = _dtype(dtype, None)
    check_out_dir(out, overwrite=overwrite)
    if artifact is not None:
        check_out_dir(artifact, overwrite=overwrite)
    m = plug(moeopt.load(model), adapter)
    m.save(out, dtype=save_dtype, overwrite=overwrite)  # type: ignore[arg-type]
    print(f"wrote {out} ({m.history[-1]})")
    if lower is not None:
        lower.run(m, PassContext())
        print(f"wrote {artifact}")
