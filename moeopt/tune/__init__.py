"""LiteMoE's per-app customisation: extract a proxy, tune LoRA on it, plug the adapter into the foundation.

    ref = "moeopt/assets/reference-moe"
    proxy = moeopt.load(ref); extract(proxy, "app:intent", keep=0.3)
    finetune(proxy, examples, TuneSettings(), Path("out/intent-adapter"))
    model = plug(moeopt.load(ref), "out/intent-adapter")      # merged, ready for `lower`

Apps are named from `moeopt.data.ALL_APPS`: the five the reference model trained on, and held-out ones
(`health-source`, `opinion-sentiment`) that are new to it, LiteMoE's setting where an adapter has a task to learn.

The names are imported on first use, so that `moeopt.tune.cli` (which `moeopt --help` imports to register
its commands) does not import torch: the runtime-only install has none.
"""

import sys
import types
from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moeopt.tune.data import Example, build_examples, read_rows
    from moeopt.tune.extract import extract, proxy_pipeline
    from moeopt.tune.lora import TuneResult, TuneSettings, app_loss, finetune, target_modules
    from moeopt.tune.meta import fingerprint, read_meta
    from moeopt.tune.plug import AdapterSet, plug

_HOME = {
    "Example": "data", "build_examples": "data", "read_rows": "data", "extract": "extract",
    "proxy_pipeline": "extract", "TuneResult": "lora", "TuneSettings": "lora", "app_loss": "lora",
    "finetune": "lora", "target_modules": "lora", "fingerprint": "meta", "read_meta": "meta",
    "AdapterSet": "plug", "plug": "plug",
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        value = getattr(import_module(f"moeopt.tune.{_HOME[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'moeopt.tune' has no attribute {name!r}")


class _Package(types.ModuleType):
    """`extract` and `plug` name both a function and its module: importing the module must not make the
    package attribute the module (`from moeopt.tune import extract` gives the function, as eager imports did)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _HOME and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__all__ = [
    "AdapterSet",
    "Example",
    "TuneResult",
    "TuneSettings",
    "app_loss",
    "build_examples",
    "extract",
    "finetune",
    "fingerprint",
    "plug",
    "proxy_pipeline",
    "read_meta",
    "read_rows",
    "target_modules",
]
