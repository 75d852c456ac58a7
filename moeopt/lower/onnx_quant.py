"""Quantized routed experts as ONNX Runtime ops: one `com.microsoft.QMoE` node per bitwidth group.

A layer after the `quantize` pass holds, per slot, either a bitwidth (packed MatMulNBits-layout weights
in `table.quantized`) or float weights. Its slots are grouped by storage format; each group gets its own
node, fed the layer's per-slot weights `sw` (N, S) gathered at the group's slots, and the outputs add
(a token's chosen slots may sit in several groups; every node weights only its own):

- quantized group -> one QMoE node. Its `router_weights` input carries `sw` directly: QMoE picks the
  top-k slots by `router_probs` (also `sw`) and applies the given weights unnormalised, so no
  log/rescale trick is needed (checked in tests/test_lower_quant.py against the reference layer).
- float group -> `com.microsoft.MoE` (or plain ops where that kernel is not exact), as float layers.
- per-expert `com.microsoft.MatMulNBits`, only where QMoE cannot express the group: activations its CPU
  kernel does not compute exactly (GELU variants, non-SiLU GLU), k > 8, or a hidden size that no block
  >= 16 dividing the group size divides (QMoE infers its sizes from the packed widths, so the input
  dimension must be whole blocks; MatMulNBits is told K and takes a zero-padded last block).

The packed bytes go in as they are, with exact conversions where a kernel lacks the format:
- 3-bit codes (MatMulNBits has no 3-bit; QMoE's INT3 wants fp16 activations) are widened to 4-bit codes
  with the same scales and zero points (symmetric ones become explicit zero points 4), at 4/3 the bytes;
- a group size the kernel cannot use is split into smaller blocks sharing the group's scale;
- an intermediate size that is not whole blocks is padded for QMoE with zero-scale rows of fc1 (the
  padded neurons compute act(0) * 0 = 0; fc2's packed rows already hold the zero padding of their
  last block).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from onnx.defs import OpSchema
from onnxscript import values

from moeopt.errors import BadInputError, UnsupportedModelError
from moeopt.ir.spec import ExpertSpec
from moeopt.lower import onnx_experts
from moeopt.lower.onnx_experts import (
    MOE_MAX_K,
    MSFT_DOMAIN,
    activation,
    dense_experts,
    glu_product,
    op,
    swiglu_attrs,
    uses_moe_op,
)
from moeopt.lower.onnx_routing import Value
from moeopt.quant.groupwise import k_blocks, pack_bits, unpack_bits
from moeopt.quant.ort_layout import glu_interleave, qmoe_group

QMOE_GLU_ACTS = ("silu", "swish")  # as "swiglu" with interleaved gate/up rows
QMOE_MLP_ACTS = {"relu": "relu", "silu": "silu", "swish": "silu"}  # its gelu is approximate (~2e-4)
QMOE_BLOCKS = (256, 128, 64, 32, 16)
NBITS_BLOCKS = (128, 64, 32, 16)
NATIVE_BITS = (2, 4, 8)  # what both kernels read; 3-bit is widened to 4

STATS: dict[str, int] = {"qmoe-nodes": 0, "float-groups": 0, "matmulnbits-groups": 0, "kernel-routed-layers": 0}


@dataclass(frozen=True)
class QuantSettings:
    """How the quantized kernels run.

    accuracy_level: MatMulNBits / QMoE `accuracy_level`; 0 keeps fp32 activations where the kernel
        has such a path (4-bit, 2-bit at block 16: exact against the dequantized weights), 4 quantizes
        activations to int8 (~1e-2 relative error, several times faster; 8-bit and 2-bit at blocks >= 32
        always run that way in QMoE on CPU).
    exact: at accuracy level 0, lower the QMoE formats whose CPU kernel quantizes activations to int8
        anyway (8-bit; 2-bit in blocks >= 32) as per-expert MatMulNBits, which keeps fp32 activations
        (within 3e-5 of the dequantized product, tests/test_quant_linears.py): exact, at the cost of
        computing those experts on every token. On real weights the int8-activation QMoE misses PyTorch
        by whole logits (split SmolLM2: 2.07 at 8 bits, 9.55 at 2 bits in blocks of 64). Off for offload
        artifacts, whose expert file holds QMoE records.
    kernel_routing: let a layer's single QMoE node route from the router logits itself where that is
        the same function (`kernel_routing`), instead of the graph's canonical router feeding it dense
        per-slot weights: ~17 fewer nodes per layer, which is most of the nodes of a decode step.
    """

    accuracy_level: int = 0
    exact: bool = False
    kernel_routing: bool = True

    def __post_init__(self) -> None:
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise BadInputError(f"accuracy_level must be 0..4, got {self.accuracy_level}")


_SETTINGS: contextvars.ContextVar[QuantSettings | None] = contextvars.ContextVar("moeopt_quant", default=None)


@contextlib.contextmanager
def quant_settings(settings: QuantSettings) -> Iterator[None]:
    """Use `settings` for the quantized layers lowered inside the block."""
    token = _SETTINGS.set(settings)
    try:
        yield
    finally:
        _SETTINGS.reset(token)


# --- what each group of slots becomes ------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    """Slots of one layer lowered together: `op` is com.microsoft.QMoE / MoE / MatMulNBits or onnx-ops."""

    slots: tuple[int, ...]
    bits: int | None  # None: float
    op: str
    block_size: int | None = None  # the block the kernel reads (may be smaller than the pass's group)
    stored_bits: int | None = None  # bits per code in the artifact (3-bit is widened to 4)
    why: str = ""  # why MatMulNBits instead of QMoE
    intermediate: int | None = None  # QMoE's intermediate size (padded to whole blocks)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"slots": list(self.slots), "bits": self.bits, "op": self.op}
        if self.bits is not None:
            out.update(block_size=self.block_size, stored_bits=self.stored_bits)
        if self.intermediate is not None:
            out["padded_intermediate"] = self.intermediate
        if self.why:
            out["why"] = self.why
        return out


def _block(group: int, dims: Sequence[int], allowed: Sequence[int]) -> int | None:
    """The largest allowed block that splits `group` exactly and divides every dim (None if none)."""
    return next((b for b in allowed if b <= group and group % b == 0 and all(d % b == 0 for d in dims)), None)


def _qmoe_unfit(spec: ExpertSpec, k: int, block: int | None) -> str:
    if spec.glu and spec.act not in QMOE_GLU_ACTS:
        return f"QMoE's GLU is SiLU-gated only, these experts use {spec.act}"
    if not spec.glu and spec.act not in QMOE_MLP_ACTS:
        return f"QMoE has no exact '{spec.act}' activation"
    if k > MOE_MAX_K:
        return f"top-k {k} is over QMoE's limit {MOE_MAX_K}"
    if block is None:
        return f"hidden {spec.hidden} is not whole blocks of >= 16 that split the group (QMoE needs whole blocks)"
    return ""


def int8_activation_format(bits: int, block: int) -> bool:
    """Whether ORT 1.32's CPU QMoE quantizes activations to int8 for this format (tests/test_quant_qmoe.py)."""
    return bits == 8 or (bits == 2 and block >= 32)


def plan(layer: Any, settings: QuantSettings | None = None) -> list[Group]:
    """How the slots of a quantized layer are lowered, one Group per storage format, in slot order.

    `settings` defaults to the lowering's (`quant_settings`); see `QuantSettings.exact`.
    """
    settings = settings or _SETTINGS.get() or QuantSettings()
    t, top_k = layer.table, layer.router.top_k
    spec = t.spec
    formats: dict[tuple[int | None, int, bool], list[int]] = {}
    for s, info in enumerate(t.slots):
        if info.bits is None:
            formats.setdefault((None, 0, True), []).append(s)
        else:
            q: Any = t.quantized[f"{s}_w_in"]
            formats.setdefault((info.bits, int(q.group_size), bool(q.symmetric)), []).append(s)
    groups = []
    for (bits, group, _), slots in formats.items():
        k = min(top_k, len(slots))
        if bits is None:
            kind = "com.microsoft.MoE" if uses_moe_op(spec, top_k, len(slots)) else "onnx-ops"
            groups.append(Group(tuple(slots), None, kind))
            continue
        stored = 4 if bits == 3 else bits
        block = _block(group, (spec.hidden,), QMOE_BLOCKS)
        why = _qmoe_unfit(spec, k, block)
        if not why and block is not None and settings.exact and settings.accuracy_level == 0 \
                and int8_activation_format(bits, block):
            why = f"QMoE's CPU kernel runs {bits}-bit blocks of {block} on int8 activations; MatMulNBits keeps fp32"
        if why or block is None:
            nb = _block(group, (), NBITS_BLOCKS)
            groups.append(Group(tuple(slots), bits, "com.microsoft.MatMulNBits", nb, stored, why))
        else:
            inter = k_blocks(spec.intermediate, block) * block
            groups.append(Group(tuple(slots), bits, "com.microsoft.QMoE", block, stored,
                                intermediate=inter if inter != spec.intermediate else None))
    return groups


def kernel_routing(layer: Any, settings: QuantSettings | None = None) -> str:
    """Why the layer's experts cannot be one QMoE node that routes from the router logits ("" = they can).

    QMoE given only `router_probs` (no `router_weights`) picks the top-k logits and weights them by the
    softmax over those k logits: for softmax routing renormalised over the chosen experts (Mixtral:
    softmax, top-k, divide by the sum) and for top-k-then-softmax routing (GraniteMoE) that is the same
    function, so the canonical router (softmax, TopK, gathers, slot scatter: ~17 nodes per layer) is
    not needed. Only with one QMoE node over every slot, slots = experts in order, nothing pruned, no
    score bias, group limit, capacity or scale. Ties: QMoE breaks exactly equal logits by the higher
    index, torch by its own order (`onnx_routing.tie_order`); equal logits need equal router rows (an
    untrained router: zeros), so routers with two equal rows keep the graph's router.
    Measured: the ~1B random Mixtral at accuracy level 0 within 2.5e-5 of the graph-routed artifact.
    """
    settings = settings or _SETTINGS.get() or QuantSettings()
    if not settings.kernel_routing:
        return "kernel routing is off"
    t, r = layer.table, layer.router
    if not len(t.quantized):
        return "float experts"
    groups = plan(layer, settings)
    if len(groups) != 1 or groups[0].op != "com.microsoft.QMoE":
        return "the experts are not one QMoE node"
    same = (r.score_fn == "softmax" and r.norm == "sum") or (r.score_fn == "topk_softmax" and r.norm in ("none", "sum"))
    if not same or r.scale != 1.0:
        return f"routing {r.score_fn}/{r.norm} (scale {r.scale:g}) is not QMoE's softmax over the top-k logits"
    if r.has_score_bias or r.n_group > 1 or r.capacity is not None or r.top_k > MOE_MAX_K:
        return "score bias, group-limited choice, capacity or k over QMoE's limit"
    if t.num_slots != r.num_experts or not bool(t.keep_mask.all()) or \
            not torch.equal(t.slot_of, torch.arange(r.num_experts, dtype=t.slot_of.dtype)):
        return "pruned or merged experts (slots are not the experts in order)"
    rows = layer.router_weight.detach().float()
    if layer.router_bias is not None:
        rows = torch.cat([rows, layer.router_bias.detach().float()[:, None]], dim=1)
    if torch.unique(rows, dim=0).shape[0] != rows.shape[0]:
        return "two router rows are equal (ties would be broken differently)"
    return ""


def check_layers(layers: Sequence[Any]) -> None:
    """Refuse tables whose packed matrices and slot bitwidths disagree, before the export starts."""
    for layer in layers:
        t = layer.table
        for s, info in enumerate(t.slots):
            for name in ("w_in", "w_out"):
                key = f"{s}_{name}"
                has = key in t.quantized
                if info.bits is None and has:
                    raise UnsupportedModelError(f"layer {layer.index} slot {s}: a packed {name} but the slot is float; "
                                                "re-run the quantize pass on the float model")
                if info.bits is not None and (not has or t.quantized[key].bits != info.bits):
                    raise UnsupportedModelError(f"layer {layer.index} slot {s}: {info.bits}-bit without a matching "
                                                f"packed {name}; re-run the quantize pass")
            if info.bits is not None and len({(t.quantized[f"{s}_{n}"].group_size, t.quantized[f"{s}_{n}"].symmetric)
                                              for n in ("w_in", "w_out")}) > 1:
                raise UnsupportedModelError(f"layer {layer.index} slot {s}: w_in and w_out differ in group size or "
                                            "zero points; one QMoE node needs one format")
        extra = [k for k in t.quantized if int(k.split("_", 1)[0]) >= t.num_slots]
        if extra:
            raise UnsupportedModelError(f"layer {layer.index}: packed matrix '{extra[0]}' has no slot")


# --- exact conversions of the packed form -----------------------------------------------------------


@dataclass(frozen=True)
class OrtMatrix:
    """A packed matrix in a format the kernel reads (attribute names as QuantizedMatrix, for ort_layout)."""

    rows: int
    cols: int
    bits: int
    group_size: int
    packed: torch.Tensor  # uint8 (rows, k_blocks * group_size * bits / 8)
    scales: torch.Tensor  # float32 (rows, k_blocks)
    zero_points: torch.Tensor | None  # uint8 packed (rows, ceil(k_blocks * bits / 8)), None = symmetric
    symmetric: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "symmetric", self.zero_points is None)


def to_ort(q: Any, block: int) -> OrtMatrix:
    """`q` (a QuantizedMatrix) with 3-bit widened to 4 and its group split into `block`-sized blocks.

    Both are exact: a code and its zero point mean the same value at any wider width, and a block of a
    group shares the group's scale and zero point.
    """
    bits, group, rows, cols = int(q.bits), int(q.group_size), int(q.rows), int(q.cols)
    packed, scales, zp = q.packed, q.scales.float(), q.zero_points
    if bits in NATIVE_BITS and block == group:
        return OrtMatrix(rows, cols, bits, group, packed, scales, zp)
    kb, kb2 = k_blocks(cols, group), k_blocks(cols, block)
    out_bits = 4 if bits == 3 else bits
    codes = unpack_bits(packed, bits, kb * group)[:, : kb2 * block]  # (R, kb2 * block)
    rep = group // block
    scales2 = scales.repeat_interleave(rep, dim=1)[:, :kb2].contiguous()  # (R, kb2)
    if zp is None and bits == out_bits:
        zp2 = None
    else:
        zcodes = (torch.full((rows, kb), 2 ** (bits - 1), dtype=torch.int64) if zp is None
                  else unpack_bits(zp, bits, kb))  # (R, kb): symmetric's implicit zero point made explicit
        zp2 = pack_bits(zcodes.repeat_interleave(rep, dim=1)[:, :kb2], out_bits)
    return OrtMatrix(rows, cols, out_bits, block, pack_bits(codes, out_bits), scales2, zp2)


def pad_rows(q: OrtMatrix, inter: int, padded: int, glu: bool) -> OrtMatrix:
    """fc1 with zero-valued rows after each half ([gate; up] for GLU) so it has `padded` neurons."""
    halves = 2 if glu else 1

    def pad(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        parts = t.reshape(halves, inter, *t.shape[1:])
        zeros = torch.zeros(halves, padded - inter, *t.shape[1:], dtype=t.dtype)  # scale 0: value 0
        return torch.cat([parts, zeros], dim=1).reshape(halves * padded, *t.shape[1:])

    packed, scales = pad(q.packed), pad(q.scales.float())
    assert packed is not None and scales is not None
    return OrtMatrix(halves * padded, q.cols, q.bits, q.group_size, packed, scales, pad(q.zero_points))


def _ort_table(table: Any, g: Group) -> Any:
    """A stand-in for the ExpertTable with converted matrices, as `qmoe_group` reads it."""
    assert g.block_size is not None
    spec = table.spec
    conv = {f"{s}_{n}": to_ort(table.quantized[f"{s}_{n}"], g.block_size) for s in g.slots for n in ("w_in", "w_out")}
    if g.intermediate is not None:
        for s in g.slots:
            conv[f"{s}_w_in"] = pad_rows(conv[f"{s}_w_in"], spec.intermediate, g.intermediate, spec.glu)
        spec = replace(spec, intermediate=g.intermediate)
    return SimpleNamespace(quantized=conv, spec=spec)


# --- ONNX emission ----------------------------------------------------------------------------------


def _const(array: np.ndarray | torch.Tensor, name: str) -> Value:
    a = array.detach().numpy() if isinstance(array, torch.Tensor) else array
    return op.Constant(value=ir.tensor(np.ascontiguousarray(a), name=name))


def _schema(name: str, inputs: list[tuple[str, str, bool]], attrs: list[tuple[str, Any]],
            types: list[tuple[str, list[str]]]) -> OpSchema:
    fp, opt = OpSchema.FormalParameter, OpSchema.FormalParameterOption
    return OpSchema(
        name, MSFT_DOMAIN, 1, doc="",
        inputs=[fp(n, t, param_option=opt.Optional if o else opt.Single) for n, t, o in inputs],
        outputs=[fp("output" if name == "QMoE" else "Y", "T")],
        type_constraints=[(t, allowed, "") for t, allowed in types],
        attributes=[OpSchema.Attribute(a, at, "") for a, at in attrs],
    )


_AT = OpSchema.AttrType
_QMOE = values.Op(values.Opset(MSFT_DOMAIN, 1), "QMoE", _schema(
    "QMoE",
    [("input", "T", False), ("router_probs", "T", False), ("fc1_experts_weights", "T1", False),
     ("fc1_scales", "T2", True), ("fc1_experts_bias", "T", True), ("fc2_experts_weights", "T1", False),
     ("fc2_scales", "T2", True), ("fc2_experts_bias", "T", True), ("fc3_experts_weights", "T1", True),
     ("fc3_scales", "T2", True), ("fc3_experts_bias", "T", True), ("fc1_zero_points", "T1", True),
     ("fc2_zero_points", "T1", True), ("fc3_zero_points", "T1", True), ("router_weights", "T", True)],
    [("k", _AT.INT), ("activation_type", _AT.STRING), ("normalize_routing_weights", _AT.INT),
     ("swiglu_fusion", _AT.INT), ("expert_weight_bits", _AT.INT), ("block_size", _AT.INT),
     ("weights_prepacked", _AT.INT), ("accuracy_level", _AT.INT), ("activation_alpha", _AT.FLOAT),
     ("activation_beta", _AT.FLOAT), ("swiglu_limit", _AT.FLOAT)],
    [("T", ["tensor(float)"]), ("T1", ["tensor(uint8)"]), ("T2", ["tensor(float)"])],
))
_NBITS = values.Op(values.Opset(MSFT_DOMAIN, 1), "MatMulNBits", _schema(
    "MatMulNBits",
    [("A", "T", False), ("B", "T1", False), ("scales", "T", False), ("zero_points", "T1", True),
     ("g_idx", "T2", True), ("bias", "T", True)],
    [("K", _AT.INT), ("N", _AT.INT), ("bits", _AT.INT), ("block_size", _AT.INT), ("accuracy_level", _AT.INT)],
    [("T", ["tensor(float)"]), ("T1", ["tensor(uint8)"]), ("T2", ["tensor(int32)"])],
))


def _group_weights(sw: Value, slots: Sequence[int], num_slots: int) -> Value:
    """(N, S) -> (N, len(slots)) per-slot weights of one group."""
    if list(slots) == list(range(num_slots)):
        return sw
    return op.Gather(sw, op.Constant(value_ints=list(slots)), axis=1)


def qmoe_biases(table: Any, g: Group, kernel_spec: ExpertSpec) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A QMoE group's (fc1, fc2) biases as the kernel reads them: fc1's (Sg, F) zero-padded to the kernel's
    intermediate size (`kernel_spec`, see `pad_rows`) with gate/up interleaved for GLU; fc2's (Sg, H)."""
    spec, idx = table.spec, list(g.slots)
    b1 = b2 = None
    if table.b_in is not None:
        b_in = table.b_in[idx].float()  # (Sg, F)
        inter, padded = spec.intermediate, kernel_spec.intermediate
        if padded != inter:
            halves = 2 if spec.glu else 1
            b_in = torch.cat([b_in.reshape(len(idx), halves, inter),
                              torch.zeros(len(idx), halves, padded - inter)], dim=2).reshape(len(idx), -1)
        b1 = b_in[:, glu_interleave(padded)] if spec.glu else b_in
    if table.b_out is not None:
        b2 = table.b_out[idx].float()
    return b1, b2


def _qmoe(x2: Value, sw: Value | None, layer: Any, g: Group, settings: QuantSettings,
          logits: Value | None = None) -> Value:
    t, spec = layer.table, layer.table.spec
    view = _ort_table(t, g)
    packed = qmoe_group(view, list(g.slots))
    name = f"layer{layer.index}.q{g.bits}"
    bias_in, bias_out = qmoe_biases(t, g, view.spec)
    b1 = None if bias_in is None else _const(bias_in, f"{name}.fc1_bias")
    b2 = None if bias_out is None else _const(bias_out, f"{name}.fc2_bias")
    z1 = None if packed.fc1_zero_points is None else _const(packed.fc1_zero_points, f"{name}.fc1_zero_points")
    z2 = None if packed.fc2_zero_points is None else _const(packed.fc2_zero_points, f"{name}.fc2_zero_points")
    attrs = packed.attributes(spec.glu)  # expert_weight_bits: the width after widening (g.stored_bits)
    STATS["qmoe-nodes"] += 1
    if logits is not None:  # the kernel routes (`kernel_routing`): softmax over the top-k logits
        probs, weights, norm = logits, None, 1
    else:
        assert sw is not None
        probs = weights = _group_weights(sw, g.slots, t.num_slots)
        norm = 0
    return _QMOE(
        x2, probs, _const(packed.fc1, f"{name}.fc1"), _const(packed.fc1_scales, f"{name}.fc1_scales"), b1,
        _const(packed.fc2, f"{name}.fc2"), _const(packed.fc2_scales, f"{name}.fc2_scales"), b2, None, None, None,
        z1, z2, None, weights,
        k=min(layer.router.top_k, len(g.slots)), activation_type="swiglu" if spec.glu else QMOE_MLP_ACTS[spec.act],
        normalize_routing_weights=norm, **{"activation_alpha": 1.0, "activation_beta": 0.0, **swiglu_attrs(spec)},
        accuracy_level=settings.accuracy_level, **attrs,
    )


def qmoe_from_logits(x2: Value, logits: Value, layer: Any) -> Value:
    """(N, H) tokens, (N, E) router logits -> (N, H): one QMoE node that routes itself (see `kernel_routing`)."""
    settings = _SETTINGS.get() or QuantSettings()
    (g,) = plan(layer, settings)
    STATS["kernel-routed-layers"] += 1
    return _qmoe(x2, None, layer, g, settings, logits=logits)


def _nbits_matmul(x: Value, q: Any, bias: Value | None, name: str, settings: QuantSettings) -> Value:
    kb = int(q.scales.shape[1])
    b = _const(q.packed.reshape(q.rows, kb, -1), f"{name}.B")  # (N, k_blocks, blob)
    scales = _const(q.scales.float().reshape(-1), f"{name}.scales")  # float16 storage: `half_scales` after export
    zp = None if q.zero_points is None else _const(q.zero_points.reshape(-1), f"{name}.zero_points")
    return _NBITS(x, b, scales, zp, None, bias, K=q.cols, N=q.rows, bits=q.bits, block_size=q.group_size,
                  accuracy_level=settings.accuracy_level)


def _matmul_nbits(x2: Value, sw: Value, layer: Any, g: Group, settings: QuantSettings) -> Value:
    """Every slot of the group on every token through two MatMulNBits, weighted by `sw`, summed."""
    t, spec = layer.table, layer.table.spec
    assert g.block_size is not None
    out = None
    for s in g.slots:
        name = f"layer{layer.index}.slot{s}.q{g.bits}"
        b_in = None if t.b_in is None else _const(t.b_in[s].float(), f"{name}.b_in")
        b_out = None if t.b_out is None else _const(t.b_out[s].float(), f"{name}.b_out")
        h = _nbits_matmul(x2, to_ort(t.quantized[f"{s}_w_in"], g.block_size), b_in, f"{name}.w_in", settings)
        if spec.glu:
            gate, up = op.Split(h, num_outputs=2, axis=-1)
            h = glu_product(gate, up, spec)
        else:
            h = activation(h, spec.act)
        y = _nbits_matmul(h, to_ort(t.quantized[f"{s}_w_out"], g.block_size), b_out, f"{name}.w_out", settings)
        y = op.Mul(y, op.Gather(sw, op.Constant(value_ints=[s]), axis=1))  # (N, H) * (N, 1)
        out = y if out is None else op.Add(out, y)
    STATS["matmulnbits-groups"] += 1
    return out


def _float_group(x2: Value, sw: Value, layer: Any, g: Group) -> Value:
    """The float slots of a mixed layer, as a float layer's experts are lowered."""
    t, spec = layer.table, layer.table.spec
    idx = list(g.slots)
    name = f"layer{layer.index}.float"
    w = _group_weights(sw, g.slots, t.num_slots)
    w_in, w_out = t.w_in[idx].float(), t.w_out[idx].float()  # (Sg, F, H), (Sg, H, I)
    STATS["float-groups"] += 1
    if g.op == "com.microsoft.MoE":
        fc1 = w_in[:, glu_interleave(spec.intermediate)] if spec.glu else w_in  # in the layout the kernel reads
        b1 = b2 = None
        if t.b_in is not None:
            b_in = t.b_in[idx].float()
            b1 = _const(b_in[:, glu_interleave(spec.intermediate)] if spec.glu else b_in, f"{name}.fc1_bias")
            b2 = _const(t.b_out[idx].float(), f"{name}.fc2_bias")
        return onnx_experts.moe_call(x2, w, _const(fc1, f"{name}.fc1"), _const(w_out, f"{name}.fc2"), spec,
                                     min(layer.router.top_k, len(idx)), b1, b2)
    b_in = None if t.b_in is None else _const(t.b_in[idx].float(), f"{name}.b_in")
    b_out = None if t.b_out is None else _const(t.b_out[idx].float(), f"{name}.b_out")
    return dense_experts(x2, w, _const(w_in, f"{name}.w_in"), _const(w_out, f"{name}.w_out"), b_in, b_out, spec)


def lower_quantized(x2: Value, sw: Value, layer: Any, top_k: int) -> Value:
    """The QUANTIZED_LOWERING hook: (N, H) tokens, (N, S) slot weights -> (N, H) routed-expert output."""
    settings = _SETTINGS.get() or QuantSettings()
    out = None
    for g in plan(layer):
        if g.op == "com.microsoft.QMoE":
            y = _qmoe(x2, sw, layer, g, settings)
        elif g.op == "com.microsoft.MatMulNBits":
            y = _matmul_nbits(x2, sw, layer, g, settings)
        else:
            y = _float_group(x2, sw, layer, g)
        out = y if out is None else op.Add(out, y)
    return out


if lower_quantized not in onnx_experts.QUANTIZED_LOWERING:
    onnx_experts.QUANTIZED_LOWERING.append(lower_quantized)
