"""LiteMoE's per-app customisation: extract a proxy, tune LoRA on it, plug the adapter into the foundation.

    ref = "moeopt/assets/reference-moe"
    proxy = moeopt.load(ref); extract(proxy, "app:intent", keep=0.3)
    finetune(proxy, examples, TuneSettings(), Path("out/intent-adapter"))
    model = plug(moeopt.load(ref), "out/intent-adapter")      # merged, ready for `lower`

Apps are named from `moeopt.data.ALL_APPS`: the five the reference model trained on, and held-out ones
(`health-source`, `opinion-sentiment`) that are new to it, LiteMoE's setting where an adapter has a task to learn.
"""

from moeopt.tune.data import Example, build_examples, read_rows
from moeopt.tune.extract import extract, proxy_pipeline
from moeopt.tune.lora import TuneResult, TuneSettings, app_loss, finetune, target_modules
from moeopt.tune.meta import fingerprint, read_meta
from moeopt.tune.plug import AdapterSet, plug

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
