"""The foundation fingerprint and the small metadata file saved beside a peft adapter.

A proxy shares every non-expert tensor (embeddings, attention, norms, routers, shared experts) with its
foundation, so a hash of those tensors names the foundation from either side: an adapter tuned on a
proxy carries the fingerprint of the foundation it plugs into, and `plug` refuses any other.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
from pathlib import Path
from typing import Any

import torch

from moeopt.errors import BadInputError
from moeopt.ir.model import MoEModel

META_FILE = "moeopt-adapter.json"
FORMAT = "moeopt-adapter"
VERSION = 1


def shared_state(model: MoEModel) -> dict[str, torch.Tensor]:
    """The model's non-expert tensors by name; peft-wrapped modules count as their base weights."""
    experts = tuple(f"{layer.path}.table." for layer in model.layers)
    out: dict[str, torch.Tensor] = {}
    for key, t in model.hf.state_dict().items():
        if "lora_" in key or key.startswith(experts):
            continue
        out[key.replace(".base_layer.", ".")] = t
    return out


def fingerprint(model: MoEModel) -> str:
    """sha256 over the names, shapes and float32 values of the non-expert tensors (dtype-independent)."""
    h = hashlib.sha256()
    for key, t in sorted(shared_state(model).items()):
        h.update(f"{key}:{tuple(t.shape)}\n".encode())
        data = t.detach().float() if t.is_floating_point() else t.detach()
        h.update(data.contiguous().cpu().numpy().tobytes())
    return "sha256:" + h.hexdigest()


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    (folder / META_FILE).write_text(json.dumps({"format": FORMAT, "version": VERSION, **meta}, indent=1))


def read_meta(folder: Path) -> dict[str, Any]:
    """The adapter folder's moeopt metadata; one-line errors for a missing or foreign folder."""
    path = Path(folder)
    if not path.is_dir():
        raise BadInputError(f"no such adapter folder: {path}")
    if not (path / META_FILE).exists():
        raise BadInputError(f"{path}: not a moeopt adapter ({META_FILE} missing; write it with `moeopt finetune`)")
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInputError(f"{path / META_FILE}: corrupt adapter metadata ({e.__class__.__name__})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or int(meta.get("version", -1)) > VERSION:
        raise BadInputError(f"{path}: unsupported adapter metadata format {meta.get('format')!r}")
    if not (path / "adapter_config.json").exists():
        raise BadInputError(f"{path}: adapter_config.json missing (not a peft adapter folder)")
    return meta


def check_foundation(model: MoEModel, meta: dict[str, Any], folder: Path, *, have: str | None = None) -> None:
    """Refuse an adapter whose recorded foundation is not `model` (fingerprint `have` if precomputed)."""
    want = meta.get("foundation", {}).get("fingerprint")
    have = have or fingerprint(model)
    if want != have:
        source = meta.get("foundation", {}).get("source", "?")
        raise BadInputError(
            f"adapter {folder} was tuned for a different foundation ({source}, {str(want)[:19]}...), "
            f"not {model.source} ({have[:19]}...): tune it again on a proxy of this model"
        )


def _status_mib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mib() -> float:
    """Resident set size of this process now, in MiB (Linux /proc; the peak where /proc is missing)."""
    now = _status_mib("VmRSS")
    return peak_rss_mib() if now is None else now


def reset_peak_rss() -> bool:
    """Restart the peak-RSS count from the current RSS (Linux clear_refs 5), so that a later
    `peak_rss_mib` is the peak of what ran in between, not of the imports before; False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mib() -> float:
    """Peak resident set size in MiB since the process started or the last `reset_peak_rss`."""
    hwm = _status_mib("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if os.uname().sysname == "Darwin" else peak / 1024
