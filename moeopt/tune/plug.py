"""Plugging app adapters into the foundation: merged into the weights (for `save` and `lower`), or kept
as peft modules with several apps side by side over one foundation (`AdapterSet`)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from moeopt.errors import BadInputError
from moeopt.ir.model import MoEModel
from moeopt.tune.lora import moe_layers, quiet_peft
from moeopt.tune.meta import check_foundation, fingerprint, read_meta


def _as_model(model: MoEModel | str | Path) -> MoEModel:
    if isinstance(model, MoEModel):
        return model
    import moeopt

    return moeopt.load(model)


def _rewrap(model: MoEModel, hf: torch.nn.Module, note: str) -> MoEModel:
    """`model` with a new host module (its MoELayers found again: copies and merges make new objects)."""
    model.hf = hf
    model.layers = moe_layers(hf)
    model.history.append(note)
    return model


def plug(model: MoEModel | str | Path, adapter: str | Path, *, merge: bool = True) -> MoEModel:
    """Apply an adapter saved by `finetune` to its foundation `model` (in place) and return it.

    merge=True folds LoRA into the adapted weights: the result is a plain MoEModel that saves and lowers
    like any other. merge=False leaves peft's LoRA modules in place (for `AdapterSet`-style use; such a
    model runs but is not meant to be saved). An adapter tuned for another foundation is refused.
    """
    from peft import PeftModel

    model = _as_model(model)
    folder = Path(adapter)
    meta = read_meta(folder)
    check_foundation(model, meta, folder)
    with quiet_peft():
        peft_model = PeftModel.from_pretrained(model.hf, str(folder), adapter_name="default")
    peft_model.eval()
    if merge:
        return _rewrap(model, peft_model.merge_and_unload(), f"plug{{adapter={folder.name}}}")
    return model


class AdapterSet:
    """Several apps' adapters side by side over one foundation (peft multi-adapter), one active at a time.

    >>> apps = AdapterSet(moeopt.load(CKPT), {"intent": "out/intent", "news": "out/news"})
    >>> apps.use("intent"); apps.logits(ids)            # foundation + intent adapter
    >>> with apps.foundation(): apps.logits(ids)        # no adapter
    >>> apps.merged("news").save("out/news-model")      # one app's model, ready for `lower`
    """

    def __init__(self, model: MoEModel | str | Path, adapters: Mapping[str, str | Path]) -> None:
        from peft import PeftModel

        if not adapters:
            raise BadInputError("AdapterSet needs at least one adapter")
        self.model = _as_model(model)
        self.fingerprint = fingerprint(self.model)
        self.paths = {name: Path(p) for name, p in adapters.items()}
        for folder in self.paths.values():
            check_foundation(self.model, read_meta(folder), folder, have=self.fingerprint)
        first, *rest = self.paths.items()
        with quiet_peft():
            self.peft: Any = PeftModel.from_pretrained(self.model.hf, str(first[1]), adapter_name=first[0])
        for name, folder in rest:
            self.peft.load_adapter(str(folder), adapter_name=name)
        self.peft.eval()
        self.use(first[0])

    @property
    def names(self) -> list[str]:
        return list(self.paths)

    @property
    def active(self) -> str:
        return str(self.peft.active_adapter)

    def use(self, name: str) -> None:
        """Make `name` the active adapter (peft set_adapter)."""
        if name not in self.paths:
            raise BadInputError(f"no adapter '{name}' in this set; adapters: {', '.join(self.paths)}")
        self.peft.set_adapter(name)

    @contextlib.contextmanager
    def foundation(self) -> Iterator[None]:
        """Run the foundation without any adapter inside this block."""
        with self.peft.disable_adapter():
            yield

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids -> (B, T, V) logits with the active adapter."""
        with torch.no_grad():
            return self.peft(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # type: ignore[no-any-return]

    def merged(self, name: str) -> MoEModel:
        """A copy of the foundation with only `name` merged into its weights (for `save` / `lower`)."""
        self.use(name)
        twin = copy.deepcopy(self.peft)
        hf = twin.merge_and_unload(adapter_names=[name])
        base = copy.copy(self.model)
        base.history = list(self.model.history)
        return _rewrap(base, hf, f"plug{{adapter={self.paths[name].name}}}")
