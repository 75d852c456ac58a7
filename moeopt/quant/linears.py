"""Non-expert linears: attention projections, shared experts, dense MLPs and (optionally) lm_head.

The `quantize` pass quantizes these when asked (`non-experts=4|8|auto`) with the same group-wise format
as the routed experts (`moeopt.quant.groupwise`). The IR keeps, per quantized linear, the packed form in
`MoEModel.linears[path]` (a `QuantizedMatrix`, MatMulNBits layout) and the dequantized values in the
nn.Linear's weight (the reference numerics), as `ExpertTable.quantized` does for experts; the lowering
(`moeopt.lower.onnx_linears`) turns each into a `com.microsoft.MatMulNBits` node.

Which linears: every `nn.Linear` of the host model except
- lm_head (the output embeddings) unless `lm-head=true`; input embeddings are never quantized. With tied
  embeddings, quantizing lm_head unties it (lm_head gets its own copy of the weight), so the embedding
  lookup keeps the float table;
- 1-wide scalar gates (Qwen2-MoE's shared-expert gate): a handful of bytes, and the gate's sigmoid
  magnifies its error.
Routed experts and routers are not nn.Linear modules in the IR, so they never appear here.

The quantizer seam: one `LinearQuantizer` per width, `(weight (N, K), hessian (K, K) or None) ->
Quantized`. `make_quantizer` returns RTN (`groupwise.quantize`, which ignores the Hessian); GPTQ
(`moeopt.quant.gptq.gptq`) plugs in there. `collect_hessians` gathers each linear's input Hessian
(mean of x xᵀ over the calibration rows) with forward hooks; the sensitivity below reads it too.

Sensitivity (for `method=ilp|greedy` with `non-experts=auto`): the squared output error per calibration
token, averaged over output features, that quantizing the linear alone adds,
    err[b] = tr(D H Dᵀ) / N    with D = W_b - W (N, K) and H = mean over rows of x xᵀ,
the same unit as the routed experts' error (mean over hidden of the squared layer output error per
token), so one knapsack can trade them. `relative` divides by the linear's output energy tr(W H Wᵀ) / N.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from moeopt import distributed
from moeopt.errors import BadInputError
from moeopt.ir.model import MoEModel
from moeopt.ir.table import QuantizedMatrix
from moeopt.quant.groupwise import Quantized, Search, dequantize, matrix_bytes, quantize, searched
from moeopt.quant.sensitivity import calibration_forwards

LinearQuantizer = Callable[[torch.Tensor, torch.Tensor | None], Quantized]
ALGOS = ("rtn", "gptq")
FLOAT_BYTES = 2  # float linears are costed as fp16, as keep-float experts are


def make_quantizer(
    bits: int, group: int, symmetric: bool, algo: str = "rtn", *, act_order: bool = True, damp: float = 0.01,
    search: Search = False,
) -> LinearQuantizer:
    """The per-linear quantizer of one width: the single place an algorithm is chosen.

    GPTQ (`moeopt.quant.gptq.gptq`, with `act_order` / `damp`) needs the linear's input Hessian
    (`needs_hessian` says so to the caller); a linear with none (never reached by the calibration data)
    is rounded to nearest.
    """
    do_search = searched(search, bits)
    if algo == "rtn":
        return lambda w, hessian: quantize(w, bits, group, symmetric, do_search)
    if algo == "gptq":
        from moeopt.quant.gptq import gptq

        def quantize_gptq(w: torch.Tensor, hessian: torch.Tensor | None) -> Quantized:
            if hessian is None:
                return quantize(w, bits, group, symmetric, do_search)
            return gptq(w, hessian, bits, group, symmetric, act_order=act_order, damp=damp, search=do_search)

        return quantize_gptq
    raise BadInputError(f"quantization algorithm '{algo}' is not one of {', '.join(ALGOS)}")


def needs_hessian(algo: str) -> bool:
    """Whether the quantizer reads input Hessians (RTN does not)."""
    return algo != "rtn"


def parse_mode(raw: str) -> int | str | None:
    """`non-experts` text -> 4 / 8, 'auto' (the allocation chooses) or None (float)."""
    low = str(raw).lower()
    if low in ("float", "fp16", "16", "none"):
        return None
    if low == "auto":
        return "auto"
    if low in ("4", "8"):
        return int(low)
    raise BadInputError(f"non-experts must be 4, 8, auto or float, got '{raw}'")


def _output_linear(hf: nn.Module) -> nn.Module | None:
    get = getattr(hf, "get_output_embeddings", None)
    out = get() if callable(get) else None
    return out if isinstance(out, nn.Linear) else None


def targets(model: MoEModel, lm_head: bool) -> list[str]:
    """Module paths of the linears `quantize` quantizes, in module order (see the module docstring)."""
    head = _output_linear(model.hf)
    out = []
    for path, mod in model.hf.named_modules():
        if not isinstance(mod, nn.Linear) or mod.out_features < 2:
            continue
        if mod is head and not lm_head:
            continue
        out.append(path)
    if lm_head and (head is None or not any(model.hf.get_submodule(p) is head for p in out)):
        raise BadInputError("lm-head=true: this model has no linear output layer to quantize")
    return out


def linear(model: MoEModel, path: str) -> nn.Linear:
    """The nn.Linear at `path` in the host model (BadInputError if it is something else)."""
    mod = model.hf.get_submodule(path)
    if not isinstance(mod, nn.Linear):
        raise BadInputError(f"{path}: not a linear layer")
    return mod


def linear_params(model: MoEModel, path: str) -> int:
    return int(linear(model, path).weight.numel())


def linear_bytes(model: MoEModel, path: str, bits: int | None, group: int, symmetric: bool) -> int:
    """Stored bytes of one linear's weight at `bits` (None: fp16), as the artifact stores it."""
    w = linear(model, path).weight
    if bits is None:
        return int(w.numel()) * FLOAT_BYTES
    return matrix_bytes(int(w.shape[0]), int(w.shape[1]), bits, group, symmetric)


def stored_bytes(model: MoEModel) -> int:
    """Bytes of the packed non-expert linears (codes, scales, zero points)."""
    total = 0
    q: Any
    for q in model.linears.values():
        total += q.packed.numel() + q.scales.numel() * q.scales.element_size()
        total += 0 if q.zero_points is None else q.zero_points.numel()
    return total


def _untie(model: MoEModel, path: str) -> None:
    """Give the output layer its own weight when it shares the input embeddings' (which stay float)."""
    hf: Any = model.hf
    head = linear(model, path)
    get = getattr(hf, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is None or head.weight.data_ptr() != emb.weight.data_ptr():
        return
    # Only the parameters part; the config keeps tie_word_embeddings, which some hosts also read for other
    # numerics (T5/Switch scale the output by d_model**-0.5 when tied). The checkpoint stores what is
    # untied as two tensors and assigns both on load, so the tie does not come back.
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)


def apply(model: MoEModel, path: str, q: Quantized) -> None:
    """Record `q` as linear `path`'s packed form and put its dequantized values in the module's weight."""
    mod = linear(model, path)
    if tuple(mod.weight.shape) != (q.rows, q.cols):
        raise BadInputError(f"{path}: not a ({q.rows}, {q.cols}) linear")
    if mod is _output_linear(model.hf):
        _untie(model, path)
    model.linears[path] = QuantizedMatrix(q.rows, q.cols, q.bits, q.group, q.symmetric, q.packed, q.scales,
                                          q.zero_points)
    with torch.no_grad():
        mod.weight.copy_(dequantize(q).to(mod.weight.dtype))


def quantize_linears(
    model: MoEModel, widths: dict[str, int | None], group: int, symmetric: bool, *, algo: str = "rtn",
    hessians: dict[str, torch.Tensor] | None = None, act_order: bool = True, damp: float = 0.01, search: Search = False,
) -> int:
    """Quantize each linear at its width (None: leave it float); returns how many were quantized."""
    quantizers: dict[int, LinearQuantizer] = {}
    done = 0
    for path, bits in widths.items():
        if bits is None:
            continue
        quant = quantizers.setdefault(bits, make_quantizer(bits, group, symmetric, algo, act_order=act_order,
                                                                  damp=damp, search=search))
        weight = linear(model, path).weight.detach().float()
        apply(model, path, quant(weight, None if hessians is None else hessians.get(path)))
        done += 1
    return done


def collect_hessians(model: MoEModel, batches: Iterable[torch.Tensor], paths: Sequence[str]) -> dict[str, torch.Tensor]:
    """Per linear, the (K, K) float32 mean of x xᵀ over every input row seen on the calibration batches."""
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def hook(path: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def observe(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (n, K)
            acc = sums.get(path)
            sums[path] = x.T @ x if acc is None else acc.addmm_(x.T, x)
            rows[path] = rows.get(path, 0) + x.shape[0]
        return observe

    handles = [linear(model, p).register_forward_hook(hook(p)) for p in paths]
    try:
        distributed.local(lambda: calibration_forwards(model, distributed.shard(list(batches))))
    finally:
        for h in handles:
            h.remove()
    if distributed.world() > 1:  # each rank saw its share of the batches: sum the float32 sums in float64
        for p in paths:
            k = linear(model, p).in_features
            sums.setdefault(p, torch.zeros(k, k))
            rows.setdefault(p, 0)
        counts = torch.tensor([float(rows[p]) for p in paths], dtype=torch.float64)
        distributed.all_reduce_([*(sums[p] for p in paths), counts])
        rows = {p: int(n) for p, n in zip(paths, counts.tolist(), strict=True) if n > 0}
    return {p: sums[p] / rows[p] for p in paths if p in sums and p in rows}


def errors(
    weight: torch.Tensor, hessian: torch.Tensor, bits: Sequence[int], group: int, symmetric: bool,
    algo: str = "rtn", *, act_order: bool = True, damp: float = 0.01, search: Search = False,
) -> tuple[dict[int | None, float], float]:
    """(err[b] per width (None: float, 0), output energy) of one (N, K) linear (see the module docstring)."""
    w = weight.detach().float()
    h = hessian.double()
    rows = w.shape[0]

    def quad(d: torch.Tensor) -> float:
        d64 = d.double()
        return float(((d64 @ h) * d64).sum()) / rows

    out: dict[int | None, float] = {None: 0.0}
    for b in bits:
        q = make_quantizer(b, group, symmetric, algo, act_order=act_order, damp=damp, search=search)(w, hessian)
        out[b] = max(quad(dequantize(q) - w), 0.0)
    return out, quad(w)
