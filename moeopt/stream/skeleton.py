"""The model of a streamed compile: the IR skeleton (every weight on the meta device) whose decoder layers
are filled from a `LazyCheckpoint` one at a time and emptied again.

Covered: Mixtral-family checkpoints (``model_type`` mixtral: per-expert ``w1``/``w3``/``w2`` tensors under
``block_sparse_moe``, or transformers' fused ``experts.gate_up_proj`` / ``experts.down_proj``), every
decoder layer an MoE layer, no shared experts or expert biases. Other architectures are refused with a
one-line reason; they load in memory as before.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moeopt.errors import UnsupportedModelError
from moeopt.ir.layer import MoELayer
from moeopt.ir.load import load_skeleton
from moeopt.ir.model import MoEModel
from moeopt.ir.table import QuantizedMatrix, SlotInfo
from moeopt.stream.reader import LazyCheckpoint

STREAMED_ARCHS = ("mixtral",)
F32 = torch.float32


def _put(module: nn.Module, key: str, value: torch.Tensor) -> None:
    if key in module._parameters:
        module._parameters[key] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[key] = value


def _empty(module: nn.Module) -> None:
    """Every parameter of `module` (recursively) back on the meta device: its memory is released."""
    for mod in module.modules():
        for key, p in mod._parameters.items():
            if p is not None and not p.is_meta:
                mod._parameters[key] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)


def husk(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor of `shape` that holds no memory (one zero, broadcast): the stand-in for weights that the
    export traces but never lowers (cold slots, whose records are already in the expert file)."""
    return torch.zeros((), dtype=dtype).expand(shape)


class LazySlots:
    """Stands for a layer's stacked slot weights (S, ...) where only `x[s]` is ever read (`routed_experts`
    runs one slot at a time, in ascending order): slot s is made by `make(s) -> (w_in, w_out)` when first
    indexed and the previous slot is dropped, so a layer's forward holds one expert in float32, not all.
    The values are those of the stacked table, so the forward computes the same bits. `shape` is the stacked
    shape (S, ...), for code that sizes the table (`ExpertTable.num_slots`) without reading it."""

    def __init__(self, make: Callable[[int], tuple[torch.Tensor, torch.Tensor]], part: int,
                 shared: dict[str, Any] | None = None, shape: tuple[int, ...] = ()) -> None:
        self.make, self.part, self.shape = make, part, torch.Size(shape)
        self.shared: dict[str, Any] = shared if shared is not None else {}

    def __getitem__(self, s: int) -> torch.Tensor:
        if self.shared.get("slot") != s:
            self.shared.clear()  # drop the previous slot before making this one
            self.shared["slot"], self.shared["w"] = s, self.make(s)
        return self.shared["w"][self.part]  # type: ignore[no-any-return]

    @staticmethod
    def pair(make: Callable[[int], tuple[torch.Tensor, torch.Tensor]], shape_in: tuple[int, ...] = (),
             shape_out: tuple[int, ...] = ()) -> tuple[LazySlots, LazySlots]:
        shared: dict[str, Any] = {}
        return LazySlots(make, 0, shared, shape_in), LazySlots(make, 1, shared, shape_out)


class StreamSkeleton:
    """An MoEModel of a checkpoint folder whose weights are read layer by layer."""

    def __init__(self, path: Path, reader: LazyCheckpoint) -> None:
        cfg = json.loads((path / "config.json").read_text())
        mt = cfg.get("model_type", "?")
        if mt not in STREAMED_ARCHS:
            raise UnsupportedModelError(f"{path}: the streamed compile covers {', '.join(STREAMED_ARCHS)} "
                                        f"checkpoints, not model_type '{mt}'; compile it without --stream")
        self.path, self.reader = path, reader
        self.model: MoEModel = load_skeleton(path)
        hf: Any = self.model.hf
        self.inner: Any = hf.model
        self.decoders = list(self.inner.layers)
        if len(self.model.layers) != len(self.decoders):
            raise UnsupportedModelError(f"{path}: {len(self.decoders)} decoder layers but "
                                        f"{len(self.model.layers)} MoE layers; the streamed compile needs every "
                                        "decoder layer to be an MoE layer")
        for i, (dec, moe) in enumerate(zip(self.decoders, self.model.layers, strict=True)):
            if getattr(dec, "mlp", None) is not moe or moe.index != i:
                raise UnsupportedModelError(f"{path}: decoder layer {i}'s MoE block is not at .mlp")
            if len(moe.shared) or moe.table.b_in is not None or moe.router_bias is not None \
                    or moe.score_bias is not None:
                raise UnsupportedModelError(f"{path}: layer {i} has shared experts or biases, which the streamed "
                                            "compile does not read")
        self.block = [self._block_prefix(i) for i in range(len(self.decoders))]
        # per layer: one slot's w_in and w_out shapes (the tables' own shapes change as slots go)
        self.slot_shapes = [(tuple(m.table.w_in.shape[1:]), tuple(m.table.w_out.shape[1:])) for m in self.model.layers]
        rot = self.inner.rotary_emb  # its inv_freq is computed at construction: build it on the CPU
        self.inner.rotary_emb = type(rot)(config=hf.config)
        self.load_module(self.inner.norm, "model.norm.")

    # -- names ------------------------------------------------------------------------------------------

    def _block_prefix(self, i: int) -> str:
        for cand in ("block_sparse_moe", "mlp"):
            if self.reader.has(f"model.layers.{i}.{cand}.gate.weight"):
                return f"model.layers.{i}.{cand}"
        raise UnsupportedModelError(f"{self.path}: no router tensor for layer {i} (model.layers.{i}."
                                    "block_sparse_moe.gate.weight)")

    def dense_names(self, i: int) -> list[tuple[nn.Module, str, str]]:
        """(module, key, checkpoint name) of decoder layer i's weights outside the routed experts."""
        out = []
        for name, mod in self.decoders[i].named_modules():
            if name == "mlp" or name.startswith("mlp."):
                continue
            for key, p in mod._parameters.items():
                if p is None:
                    continue
                full = f"{name}.{key}" if name else key
                out.append((mod, key, f"model.layers.{i}.{full}"))
        out.append((self.model.layers[i], "router_weight", f"{self.block[i]}.gate.weight"))
        return out

    # -- loading and releasing ------------------------------------------------------------------------------

    def load_module(self, module: nn.Module, prefix: str) -> None:
        for key in [k for k, p in module._parameters.items() if p is not None]:
            _put(module, key, self.reader.read(prefix + key, F32))

    def load_top(self, embed: bool = True, head: bool = True) -> None:
        """The embedding table and/or the LM head (tied: the embedding's values)."""
        if embed:
            self.load_module(self.inner.embed_tokens, "model.embed_tokens.")
        if head:
            lm: Any = self.model.hf.lm_head
            name = "lm_head.weight" if self.reader.has("lm_head.weight") else "model.embed_tokens.weight"
            _put(lm, "weight", self.reader.read(name, F32))

    def drop_top(self) -> None:
        _empty(self.inner.embed_tokens)
        _empty(self.model.hf.lm_head)  # type: ignore[arg-type]
        self._husk_linears(self.model.hf.lm_head)  # type: ignore[arg-type]

    def load_dense(self, i: int) -> None:
        for mod, key, name in self.dense_names(i):
            _put(mod, key, self.reader.read(name, F32))

    def drop_dense(self, i: int) -> None:
        for mod, key, _ in self.dense_names(i):
            p = mod._parameters[key]
            if p is not None:
                mod._parameters[key] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        self._husk_linears(self.decoders[i])

    def _husk_linears(self, within: nn.Module) -> None:
        """The packed forms of the quantized linears inside `within` (`MoEModel.linears`) as weightless
        stand-ins: their formats stay for the manifest and the tolerance's int8 sites, their memory goes."""
        mods = set(within.modules())
        for path, q in list(self.model.linears.items()):
            if self.model.hf.get_submodule(path) in mods:
                self.model.linears[path] = husk_matrix(q)

    def expert(self, i: int, e: int, w_in: torch.Tensor | None = None,
               w_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e of layer i in float32: w_in (2I, H) gate rows then up rows, w_out (H, I), written into the
        given tensors (or new ones). Each stored tensor is upcast as it is copied: no float32 copy of a
        whole tensor is made besides the destination."""
        bp, r = self.block[i], self.reader
        shape_in, shape_out = self.slot_shapes[i]
        w_in = torch.empty(shape_in, dtype=F32) if w_in is None else w_in
        w_out = torch.empty(shape_out, dtype=F32) if w_out is None else w_out
        if r.has(f"{bp}.experts.{e}.w1.weight"):
            inter = shape_in[0] // 2
            w_in[:inter].copy_(r.read(f"{bp}.experts.{e}.w1.weight"))
            w_in[inter:].copy_(r.read(f"{bp}.experts.{e}.w3.weight"))
            w_out.copy_(r.read(f"{bp}.experts.{e}.w2.weight"))
        elif r.has(f"{bp}.experts.gate_up_proj"):
            w_in.copy_(r.read(f"{bp}.experts.gate_up_proj", row=e))
            w_out.copy_(r.read(f"{bp}.experts.down_proj", row=e))
        else:
            raise UnsupportedModelError(f"{self.path}: no expert tensors for layer {i} expert {e} "
                                        f"({bp}.experts.{e}.w1.weight)")
        return w_in, w_out

    def load_experts(self, i: int, slots: list[SlotInfo],
                     make: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        """Layer i's table with these slots, weights read from the shards (each slot its own expert,
        members[0]) or made by `make(s)` (merged slots)."""
        t = self.model.layers[i].table
        shape_in, shape_out = self.slot_shapes[i]
        self.reader.acquire(i)
        w_in = torch.empty((len(slots), *shape_in), dtype=F32)
        w_out = torch.empty((len(slots), *shape_out), dtype=F32)
        for s, info in enumerate(slots):
            if make is None:
                self.expert(i, info.members[0], w_in[s], w_out[s])
            else:
                w_in[s], w_out[s] = make(s)
        t.set_slots(w_in, w_out, slots)

    def lazy_experts(self, i: int, slots: list[SlotInfo],
                     make: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        """Layer i's table with these slots, each read (or made by `make(s)`) only when the forward reaches
        it (see `LazySlots`): for forwards, which read one slot at a time."""
        t = self.model.layers[i].table
        n = len(slots)
        t.set_slots(torch.empty((n, 0)), torch.empty((n, 0)), slots)
        self.reader.acquire(i)
        s_in, s_out = self.slot_shapes[i]
        w_in, w_out = LazySlots.pair(make or (lambda s: self.expert(i, slots[s].members[0])), (n, *s_in), (n, *s_out))
        t._parameters["w_in"], t._parameters["w_out"] = w_in, w_out  # type: ignore[assignment]

    def drop_experts(self, i: int, slots: list[SlotInfo], quantized: dict[str, dict[str, Any]], *,
                     release: bool = True) -> None:
        """Layer i's table as weightless stand-ins of these slots (and packed formats): what the export
        traces, the manifest describes and `cold_groups` plans, with no memory behind the weights."""
        t = self.model.layers[i].table
        s_in, s_out = self.slot_shapes[i]
        n = len(slots)
        t.set_slots(torch.empty((n, 0)), torch.empty((n, 0)), slots)
        t.w_in = nn.Parameter(husk((n, *s_in), F32), requires_grad=False)
        t.w_out = nn.Parameter(husk((n, *s_out), F32), requires_grad=False)
        for key, q in quantized.items():
            zp = q["zero_points"]
            t.quantized[key] = QuantizedMatrix(
                q["rows"], q["cols"], q["bits"], q["group_size"], q["symmetric"],
                husk(tuple(q["packed"][0]), getattr(torch, q["packed"][1])),
                husk(tuple(q["scales"][0]), getattr(torch, q["scales"][1])),
                None if zp is None else husk(tuple(zp[0]), getattr(torch, zp[1])))
        if release:
            self.reader.release(i)

    # -- compute ---------------------------------------------------------------------------------------

    def forward_layer(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        """Decoder layer i on (B, T, H) hidden states, exactly as inside the whole model's forward (the
        model's own forward runs with only this layer in its list, so masks and rotary embeddings are
        computed as a full forward computes them)."""
        dec = self.decoders[i]
        got: dict[str, torch.Tensor] = {}

        def keep(_m: nn.Module, _a: Any, out: Any) -> None:
            got["h"] = out[0] if isinstance(out, tuple) else out

        handle = dec.register_forward_hook(keep)
        saved = self.inner.layers
        self.inner.layers = nn.ModuleList([dec])
        try:
            with torch.no_grad():
                self.inner(inputs_embeds=hidden, use_cache=False)
        finally:
            self.inner.layers = saved
            handle.remove()
        return got["h"]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.inner.embed_tokens(ids)  # type: ignore[no-any-return]

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model.hf.lm_head(self.inner.norm(hidden))  # type: ignore[no-any-return,operator]


def husk_matrix(q: QuantizedMatrix) -> QuantizedMatrix:
    """`q`'s format with weightless buffers of the same shapes and dtypes (`husk`)."""
    def empty(b: Any) -> torch.Tensor:
        return husk(tuple(b.shape), b.dtype)

    zp = q.zero_points
    return QuantizedMatrix(q.rows, q.cols, q.bits, q.group_size, q.symmetric, empty(q.packed), empty(q.scales),
                           None if zp is None else empty(zp))


def quantized_meta(layer: MoELayer) -> dict[str, dict[str, Any]]:
    """The packed matrices' formats and buffer shapes (no values), as `drop_experts` rebuilds them."""
    out = {}
    for key, q in layer.table.quantized.items():
        assert isinstance(q, QuantizedMatrix)
        d = q.meta()
        for name in ("packed", "scales", "zero_points"):
            b = getattr(q, name)
            d[name] = None if b is None else [list(b.shape), str(b.dtype).removeprefix("torch.")]
        out[key] = d
    return out
