"""LiteMoE proxy extraction: importance (and loss sensitivity) on one app's data, then prune + ILP match +
aligned merge, and a refit of the kept experts to the foundation's layer outputs on that data.

The proxy keeps the foundation's non-expert weights (attention, embeddings, norms, routers) bit for bit
and only shrinks the routed experts, so adapters tuned on those shared modules plug back into the
foundation. This is the one place the proxy pipeline text is spelled; the demo and the benchmarks build
the same pipeline through `proxy_pipeline`.
"""

from __future__ import annotations

from pathlib import Path

from moeopt.errors import BadInputError
from moeopt.ir.model import MoEModel
from moeopt.passes.base import PassContext
from moeopt.passes.manager import PassManager, RunReport
from moeopt.passes.pipeline import option_text
from moeopt.passes.sensitivity import TEXT_TOKENS


def check_keep(keep: float) -> float:
    """`keep` is the share of each layer's original experts kept as hot slots: in (0, 1]."""
    if not 0.0 < keep <= 1.0:
        raise BadInputError(f"--keep must be in (0, 1] (share of routed experts kept), got {keep}")
    return keep


def calib_spec(data: str) -> str:
    """A calibration spec for `importance{calib=...}`: `app:NAME[:SPLIT]` as is, else an existing JSONL file."""
    if data.startswith("app:"):
        from moeopt.data.apps import get_app

        get_app(data[4:].partition(":")[0])
        return data
    path = Path(data)
    if not path.is_file():
        raise BadInputError(f"no such app data file: {data} (give a JSONL file or app:NAME[:SPLIT])")
    if ";" in data:  # the importance pass splits its calib list on ';'
        raise BadInputError(f"app data path must not contain ';': {data}")
    return data


RANKS = ("loss", "freq")
IO_TOKENS = 8192  # layer inputs and outputs recorded for refit: 2 x tokens x hidden x 4 bytes a layer


def check_rank(rank: str) -> str:
    """`rank` is how the proxy ranks experts: loss (sensitivity) or freq (routing frequency)."""
    if rank not in RANKS:
        raise BadInputError(f"--rank must be one of {', '.join(RANKS)}, got '{rank}'")
    return rank


def proxy_pipeline(
    calib: str, keep: float, *, cold: float | None = None, calib_tokens: int = 16384, align: str = "assignment",
    rank: str = "loss", rows: int = 128, refit: bool = True,
) -> str:
    """Pipeline text of one app's LiteMoE proxy.

    Args:
        calib: calibration spec (`app:NAME[:SPLIT]` or a JSONL path).
        keep: share of the original experts kept as hot slots.
        cold: share removed outright; None splits the removed share evenly into cold and moderate
            (the moderate half is merged into hot experts), as in LiteMoE.
        calib_tokens: calibration tokens read for the importance statistics.
        align: neuron alignment of the merge (assignment, ot, none).
        rank: what ranks experts hot / moderate / cold and weighs them in the merge. ``loss`` (default):
            the `sensitivity` analysis, the rise of the app's loss (gold-label NLL on `rows` labelled rows)
            when the expert is masked; ``freq``: LiteMoE's routing frequency. On the reference model at
            half the experts, freq kept 92.6% of the apps' accuracy and loss 97.3% (bench/compression.py).
        rows: labelled rows the sensitivity is measured on (``rank=loss``).
        refit: record the foundation's MoE layer outputs on the calibration tokens first (`layer-io`) and,
            after the merge, fit the kept experts to reproduce them (`refit`). The proxy then computes
            what the foundation computes on the app's data, and an adapter tuned on it transfers better.
    """
    check_keep(keep)
    check_rank(rank)
    cold = round((1.0 - keep) / 2, 4) if cold is None else cold
    if not 0.0 <= cold <= 1.0 - keep + 1e-9:
        raise BadInputError(f"--cold must be in [0, 1 - keep] = [0, {1 - keep:.4g}], got {cold}")
    value = option_text(calib)
    imp = f"importance{{calib={value},max-tokens={calib_tokens},progress=false}}"
    opts = [] if align == "assignment" else [f"align={align}"]
    if rank == "loss":
        tokens = min(calib_tokens, TEXT_TOKENS)  # plain text: one pass per expert, so fewer than importance reads
        imp += f",sensitivity{{calib={value},rows={rows},max-tokens={tokens},progress=false}}"
        prune = f"prune{{keep={keep},cold={cold},score=loss}}"
        opts.append("weight=loss")
    else:
        prune = f"prune{{keep={keep},cold={cold}}}"
    merge = f"merge{{{','.join(opts)}}}" if opts else "merge"
    text = f"{imp},{prune},match,{merge},canonicalize"
    if not refit:
        return text
    record = f"layer-io{{calib={value},max-tokens={min(calib_tokens, IO_TOKENS)},progress=false}}"
    return f"{record},{text},refit"


def extract(
    model: MoEModel,
    data: str,
    *,
    keep: float = 0.3,
    cold: float | None = None,
    calib_tokens: int = 16384,
    data_root: Path | None = None,
    verify_each: bool = True,
    rank: str = "loss",
    refit: bool = True,
) -> RunReport:
    """Turn `model` (in place) into the proxy of the app whose data is `data`; returns the run report."""
    text = proxy_pipeline(calib_spec(data), keep, cold=cold, calib_tokens=calib_tokens, rank=rank, refit=refit)
    pm = PassManager(text, verify_each=verify_each, ctx=PassContext(data_root=data_root))
    return pm.run(model)
