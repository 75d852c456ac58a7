"""`moeopt lower` and `moeopt run`: build an artifact, and generate from one (registered in moeopt.cli)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from moeopt.errors import BadInputError


def lower_cmd(
    model: Annotated[str, typer.Argument(help="checkpoint folder (Hugging Face or moeopt)")],
    out: Annotated[Path, typer.Option("-o", "--out", help="artifact folder to write")],
    target: Annotated[str, typer.Option(help="target profile: x86_64 or arm64")] = "x86_64",
    threads: Annotated[int, typer.Option(help="intra-op threads recorded in the profile (0: all cores)")] = 0,
    opt_level: Annotated[str, typer.Option(help="none, or extended: store the ORT-optimised graph")] = "none",
    passes_text: Annotated[str, typer.Option("--passes", help="passes to run before lowering")] = "",
) -> None:
    """Lower a model to an ONNX Runtime artifact (model.onnx + manifest.json + tokenizer)."""
    import moeopt
    from moeopt.passes import PassContext, PassManager
    from moeopt.passes.lower import Lower

    lower = Lower(out=out, target=target, threads=threads, opt_level=opt_level)  # options checked before loading
    pm = PassManager(passes_text) if passes_text else None
    m = moeopt.load(model)
    if pm is not None:
        m = pm.run(m, source=model).model
    lower.run(m, PassContext())
    print(f"wrote {out}")


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
) -> None:
    """Generate from an artifact with the KV cache, printing tokens as they come and the tokens/s."""
    from moeopt.runtime import Sampler, Session

    sampler = Sampler(sample, temperature, top_k, top_p, seed)
    sess = Session(artifact, threads=threads)
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


def _tokenizer(artifact: Path, manifest: dict[str, Any]) -> Any:
    name = manifest.get("tokenizer")
    if not name:
        raise BadInputError(f"{artifact}: the artifact has no tokenizer; use --ids instead of --prompt")
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(artifact / name))
