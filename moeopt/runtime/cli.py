"""`moeopt lower` and `moeopt run`: build an artifact, and generate from one (registered in moeopt.cli)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from moeopt.errors import BadInputError
from moeopt.outdir import OVERWRITE_HELP, check_out_dir


def lower_cmd(
    model: Annotated[str, typer.Argument(help="checkpoint folder (Hugging Face or moeopt)")],
    out: Annotated[Path, typer.Option("-o", "--out", help="artifact folder to write")],
    target: Annotated[str, typer.Option(help="target profile: x86_64 or arm64")] = "x86_64",
    threads: Annotated[int, typer.Option(help="intra-op threads recorded in the profile (0: all cores)")] = 0,
    opt_level: Annotated[str, typer.Option(help="none, or extended: store the ORT-optimised graph")] = "none",
    passes_text: Annotated[str, typer.Option("--passes", help="passes to run before lowering")] = "",
    experts: Annotated[str, typer.Option(help="resident, or offload: cold experts in experts.bin")] = "resident",
    hot: Annotated[str, typer.Option(help="offload: hot experts per layer kept in the graph (N or all)")] = "2",
    prefetch_top: Annotated[int, typer.Option(help="offload: experts each prefetch hint names "
                                              "(0: the router's top_k)")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help=OVERWRITE_HELP)] = False,
    attention: Annotated[str, typer.Option(help="auto, gqa (com.microsoft.GroupQueryAttention, KV cache updated "
                                           "in place) or export (the attention as traced)")] = "auto",
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="run the written artifact in onnxruntime "
                                         "against the model in PyTorch before it is renamed into place, and "
                                         "refuse it beyond its parity tolerance")] = True,
) -> None:
    """Lower a model to an ONNX Runtime artifact (model.onnx + manifest.json + tokenizer), verified.

    Under torchrun the ranks split the work of --passes (see moeopt.distributed); rank 0 alone lowers.
    """
    from moeopt import distributed

    with distributed.session():
        _lower(model, out, target, threads, opt_level, passes_text, experts, hot, prefetch_top, overwrite, attention,
               verify)


def _lower(
    model: str, out: Path, target: str, threads: int, opt_level: str, passes_text: str, experts: str, hot: str,
    prefetch_top: int, overwrite: bool, attention: str, verify: bool,
) -> None:
    import moeopt
    from moeopt import distributed
    from moeopt.passes import PassContext, PassManager
    from moeopt.passes.lower import Lower

    lower = Lower(out=out, target=target, threads=threads, opt_level=opt_level, experts=experts, hot=hot,
                  prefetch_top=prefetch_top, overwrite=overwrite, verify=verify, attention=attention)
    lower.hot_slots()  # options checked before loading
    check_out_dir(out, overwrite=overwrite)
    pm = PassManager(passes_text) if passes_text else None
    if pm is not None and any(p.name == "lower" for p in pm.passes):
        raise BadInputError("--passes must not contain lower: this command lowers; give its options here "
                            "(or run the whole pipeline with `moeopt convert`)")
    m = moeopt.load(model)
    if pm is not None:
        m = pm.run(m, source=model).model
    result = lower.run(m, PassContext())
    measured = result.stats.get("parity-measured")
    if distributed.is_main():
        print(f"wrote {out}" + (f" (verified: max |logit diff| {measured:.3g})" if measured is not None
                                else " (not verified: --no-verify)"))


def run_cmd(
    artifact: Annotated[Path, typer.Argument(help="artifact folder written by `moeopt lower`")],
    prompt: Annotated[str, typer.Option(help="prompt text (needs the artifact's tokenizer.json)")] = "",
    ids: Annotated[str, typer.Option(help="prompt as comma-separated token ids instead of text")] = "",
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate")] = 32,
    sample: Annotated[bool, typer.Option("--sample", help="sample instead of greedy decoding")] = False,
    temperature: Annotated[float, typer.Option(help="sampling temperature")] = 1.0,
    top_k: Annotated[int, typer.Option(help="sample from the k best tokens (0: all)")] = 0,
    top_p: Annotated[float, typer.Option(help="nucleus sampling mass")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="sampling seed")] = None,
    threads: Annotated[int | None, typer.Option(help="override the profile's intra-op threads")] = None,
    budget: Annotated[str, typer.Option(help="offload artifacts: expert cache budget, e.g. 64MB "
                                        "(default: the plan's cache, else every expert in memory)")] = "",
    policy: Annotated[str, typer.Option(help="offload: cache policy lru|lfu|fifo|edgemoe|committee|on-demand "
                                        "(default: the plan's, else lfu)")] = "",
    prefetch: Annotated[str, typer.Option(help="offload: auto (the graph's predictor hints when it has them), "
                                          "graph, stats (EdgeMoE table learned online) or none")] = "auto",
    page_cache: Annotated[bool, typer.Option("--page-cache/--no-page-cache", help="offload: keep the expert "
                                             "file's pages in the page cache after a read (--no-page-cache "
                                             "drops them: for memory limits that count the page cache)")] = True,
    prefetch_min_precision: Annotated[float | None, typer.Option(
        help="offload, graph prefetch: stop prefetching once fewer than this share of the prefetches "
             "were used (after 64)")] = None,
) -> None:
    """Generate from an artifact with the KV cache, printing tokens as they come and the tokens/s."""
    from moeopt.runtime import Sampler, open_artifact

    sampler = Sampler(sample, temperature, top_k, top_p, seed)
    source = offload_source(artifact, budget, policy, prefetch, page_cache, prefetch_min_precision)
    sess = open_artifact(artifact, threads=threads, **({"source": source} if source is not None else {}))
    try:
        _generate(sess, artifact, prompt, ids, max_new_tokens, sampler)
    finally:  # an offload session's expert cache: stop its I/O threads and close its file
        close = getattr(sess, "close", None)
        if close is not None:
            close()


def _generate(sess: Any, artifact: Path, prompt: str, ids: str, max_new_tokens: int, sampler: Any) -> None:
    tok = _tokenizer(artifact, sess.manifest) if prompt else None
    if prompt and ids:
        raise BadInputError("give --prompt or --ids, not both")
    if ids:
        try:
            prompt_ids = [int(t) for t in ids.split(",") if t.strip()]
        except ValueError:
            raise BadInputError(f"--ids expects comma-separated integers, got '{ids}'") from None
    elif tok is not None:
        prompt_ids = tok.encode(prompt).ids
    else:
        raise BadInputError("give --prompt TEXT or --ids 1,2,3")
    if not prompt_ids:
        raise BadInputError("the prompt is empty")
    vocab = int(sess.manifest.get("vocab_size", 0))
    if vocab and max(prompt_ids) >= vocab:
        raise BadInputError(f"token id {max(prompt_ids)} is outside the vocabulary (size {vocab})")
    generated: list[int] = []
    shown = [""]

    def stream(step: int, new: np.ndarray) -> None:
        generated.append(int(new[0]))
        if tok is None:
            sys.stdout.write(f"{int(new[0])} ")
        else:  # decode the whole tail each time: a character may span several tokens
            text = tok.decode(generated)
            sys.stdout.write(text[len(shown[0]):])
            shown[0] = text
        sys.stdout.flush()

    if tok is not None:
        sys.stdout.write(prompt)
    g = sess.generate(np.array([prompt_ids], dtype=np.int64), max_new_tokens, sampler=sampler, on_token=stream)
    prefill_tps = len(prompt_ids) / g.prefill_seconds if g.prefill_seconds > 0 else 0.0
    print(f"\n[{g.new_tokens} tokens; prefill {prefill_tps:.1f} tok/s, decode {g.decode_tokens_per_s:.1f} tok/s]")
    counters = getattr(getattr(sess, "source", None), "counters", None)
    if counters is not None:
        c = counters.as_dict()
        rate = c["hits"] / c["acquired"] if c["acquired"] else 1.0
        print(f"[experts: {c['acquired']} used, hit rate {rate:.2f}, {c['misses']} misses, "
              f"{c['bytes_read'] / 2**20:.1f} MiB read, stall {c['stall_seconds'] * 1000:.0f} ms, "
              f"prefetch recall {c['recall']:.2f}]")
        if c["layers"]:
            print("[misses / stall by layer: " + "; ".join(
                f"{i}: {la['misses']} / {la['stall_seconds'] * 1000:.0f} ms" for i, la in c["layers"].items()) + "]")


def offload_source(artifact: Path, budget: str, policy: str, prefetch: str, page_cache: bool = True,
                   min_precision: float | None = None) -> Any:
    """The expert source `moeopt run` opens an offload artifact with (None: the artifact's default).

    `page_cache` False drops each expert record's pages from the page cache once read (`ExpertStore`):
    under a memory limit that counts the page cache (a board, a memory cgroup) the expert file's cached
    pages otherwise push out the pages the runtime itself runs from (its libraries, the segments' weights).

    Raises:
        BadInputError: offload options on a resident artifact, an unknown policy or prefetcher, or a
            budget below the minimum (the message names it).
    """
    from moeopt.runtime.cache_policies import DEFAULT_POLICY, POLICIES
    from moeopt.runtime.manifest import read_manifest
    from moeopt.units import parse_bytes

    manifest = read_manifest(artifact, verify=False)
    offload = manifest.get("offload")
    if offload is None:
        if budget or policy or prefetch != "auto":
            raise BadInputError(f"{artifact}: --budget/--policy/--prefetch need an offload artifact "
                                "(lower{experts=offload})")
        return None
    plan = manifest.get("plan") or {}
    policy = policy or str(plan.get("policy", DEFAULT_POLICY))
    if policy == "swapmoe":
        policy = "committee"
    if policy not in POLICIES:
        raise BadInputError(f"unknown cache policy '{policy}'; choose one of {', '.join(POLICIES)}")
    if prefetch not in ("auto", "graph", "stats", "none"):
        raise BadInputError(f"unknown --prefetch '{prefetch}'; choose auto, graph, stats or none")
    if not budget and "cache_bytes" not in plan:
        return None  # every expert in memory (AllResident)
    from moeopt.runtime.expert_cache import cache_source
    from moeopt.runtime.prefetch import GraphHints, Prefetcher, StatsTable

    nbytes = parse_bytes(budget) if budget else int(plan["cache_bytes"])
    on_demand = policy in ("on-demand", "none")  # the on-demand baseline never prefetches
    if prefetch == "auto":
        prefetch = "graph" if offload.get("prefetch") and not on_demand else "none"
    elif prefetch != "none" and on_demand:
        raise BadInputError(f"--policy {policy} loads experts on demand and never prefetches; "
                            f"drop --prefetch {prefetch}")
    if prefetch == "graph" and not offload.get("prefetch"):
        raise BadInputError(f"{artifact}: no predictor outputs in the graph; lower a model that ran the "
                            "predictor pass, or use --prefetch stats")
    prefetcher: Prefetcher | None = None
    if prefetch == "graph":
        prefetcher = GraphHints(min_precision=min_precision)
    elif prefetch == "stats":
        prefetcher = StatsTable()
    return cache_source(nbytes, policy, prefetcher, page_cache=page_cache)


def _tokenizer(artifact: Path, manifest: dict[str, Any]) -> Any:
    name = manifest.get("tokenizer")
    if not name:
        raise BadInputError(f"{artifact}: the artifact has no tokenizer; use --ids instead of --prompt")
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(artifact / name))
