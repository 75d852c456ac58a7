"""Mapping a Hugging Face MoE block onto the canonical MoELayer.

A block is recognised by structure: an `experts` child (fused 3-D expert weights, or a ModuleList /
ModuleDict of MLPs), a router holding an (E, H) weight, and optional shared experts. Its router
semantics come from the adapter of its class when there is one; otherwise candidate RouterSpecs built
from the block's attributes are tried against the block itself on a probe input and the first that
reproduces its output is kept. Every conversion is checked that way, so a block is never silently
mis-mapped: an architecture that cannot be reproduced is an UnsupportedModelError naming the class.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers.activations import ACT2CLS, ACT2FN

from moeopt.errors import UnsupportedModelError
from moeopt.ir.layer import DenseExpert, MoELayer
from moeopt.ir.spec import ExpertSpec, RouterSpec, SharedSpec
from moeopt.ir.table import ExpertTable

ROUTER_NAMES = ("gate", "router", "wg", "classifier")
SHARED_NAMES = ("shared_expert", "shared_experts", "shared_mlp")
# (gate, up, down) or (in, down) attribute names of per-expert MLP modules, as architectures spell them.
MLP_LAYOUTS: tuple[tuple[str, ...], ...] = (
    ("gate_proj", "up_proj", "down_proj"),
    ("w1", "w3", "w2"),
    ("wi", "wo"),
    ("fc1", "fc2"),
    ("up_proj", "down_proj"),
)
ACT_ATTRS = ("act_fn", "act", "activation_fn", "activation")


@dataclass
class RouterParts:
    weight: torch.Tensor  # (E, H)
    bias: torch.Tensor | None
    score_bias: torch.Tensor | None
    module: nn.Module


@dataclass
class ExpertParts:
    spec: ExpertSpec
    w_in: torch.Tensor  # (E, F, H)
    w_out: torch.Tensor  # (E, H, I)
    b_in: torch.Tensor | None
    b_out: torch.Tensor | None


def _attr(objs: Sequence[Any], *names: str, default: Any = None) -> Any:
    """First attribute found among `names` on the objects, in order (block, router, config ...)."""
    for obj in objs:
        for name in names:
            val = getattr(obj, name, None)
            if val is not None:
                return val
    return default


_FUNCTIONS: dict[str, Callable[..., Any]] = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu}


def activation_name(act: nn.Module | Callable[..., Any], preferred: str | None = None) -> str:
    """The ACT2FN key that builds an activation identical to `act` (so the IR's numerics match)."""
    if not isinstance(act, nn.Module):  # a plain function (LFM2-MoE's F.silu)
        for name, fn in _FUNCTIONS.items():
            if act is fn:
                return name
        raise UnsupportedModelError(f"activation function {getattr(act, '__name__', act)!r} has no ACT2FN equivalent")
    names = ([preferred] if preferred in ACT2CLS else []) + list(ACT2CLS)
    for name in names:
        assert name is not None
        cand = ACT2FN[name]
        if type(cand) is type(act) and _public_vars(cand) == _public_vars(act):
            return name
    raise UnsupportedModelError(f"activation {type(act).__name__} has no transformers ACT2FN equivalent")


def _public_vars(m: Any) -> dict[str, Any]:
    def norm(v: Any) -> Any:  # partials (Gemma 4's GELUTanh.act) compare by what they call
        return (v.func, v.args, tuple(sorted(v.keywords.items()))) if isinstance(v, functools.partial) else v

    return {k: norm(v) for k, v in vars(m).items() if not k.startswith("_") and k != "training"}


def find_experts(block: nn.Module) -> nn.Module | None:
    ex = getattr(block, "experts", None)
    return ex if isinstance(ex, nn.Module) else None


def _expert_modules(ex: nn.Module) -> list[nn.Module]:
    if isinstance(ex, nn.ModuleList):
        return list(ex)
    if isinstance(ex, nn.ModuleDict):
        # Switch names them expert_0, expert_1, ...: order by the number, not the string.
        def key(name: str) -> tuple[int, str]:
            m = re.search(r"(\d+)$", name)
            return (int(m.group(1)) if m else -1, name)

        return [ex[k] for k in sorted(ex.keys(), key=key)]
    return []


def is_fused_experts(ex: nn.Module) -> bool:
    w = getattr(ex, "gate_up_proj", None)
    if w is None:
        w = getattr(ex, "up_proj", None)
    return isinstance(w, torch.Tensor) and w.dim() == 3 and isinstance(getattr(ex, "down_proj", None), torch.Tensor)


def _mlp_layout(m: nn.Module) -> tuple[str, ...] | None:
    for layout in MLP_LAYOUTS:
        if all(isinstance(getattr(m, n, None), nn.Linear) for n in layout):
            return layout
    return None


def looks_like_moe_block(block: nn.Module) -> bool:
    """Structure test: an experts container of >= 2 experts next to a router-like child."""
    ex = find_experts(block)
    if ex is None:
        return False
    if not is_fused_experts(ex):
        mods = _expert_modules(ex)
        if len(mods) < 2 or any(_mlp_layout(m) is None for m in mods):
            return False
    return any(isinstance(getattr(block, n, None), nn.Module) for n in ROUTER_NAMES)


def _act_of(m: nn.Module, preferred: str | None) -> str:
    act = _attr([m], *ACT_ATTRS)
    if act is None:
        raise UnsupportedModelError(f"{type(m).__name__}: no activation attribute ({', '.join(ACT_ATTRS)})")
    return activation_name(act, preferred)


def extract_experts(ex: nn.Module, preferred_act: str | None) -> ExpertParts:
    """Routed expert weights as stacked (E, F, H) / (E, H, I) tensors, in the canonical row layout."""
    if is_fused_experts(ex):
        from transformers.integrations.moe import _default_apply_gate

        swiglu: dict[str, Any] = {}
        if getattr(type(ex), "_apply_gate", _default_apply_gate) is not _default_apply_gate:
            swiglu = _clamped_gate(ex) or {}  # first: a probe that misses the limit would pass as plain
            if not swiglu and not _plain_gate(ex, preferred_act):
                raise UnsupportedModelError(
                    f"{type(ex).__name__}: custom gating function `_apply_gate` (not act(gate) * up)"
                )
        if getattr(ex, "has_post_expert_norm", False):
            raise UnsupportedModelError(f"{type(ex).__name__}: a norm after each expert is not in the IR")
        transposed = bool(getattr(ex, "is_transposed", False))
        glu = isinstance(getattr(ex, "gate_up_proj", None), torch.Tensor)
        w_in: torch.Tensor = getattr(ex, "gate_up_proj" if glu else "up_proj")
        w_out: torch.Tensor = ex.down_proj  # type: ignore[assignment]
        if transposed:
            w_in, w_out = w_in.transpose(1, 2), w_out.transpose(1, 2)
        b_in = getattr(ex, "gate_up_proj_bias" if glu else "up_proj_bias", None)
        if glu and not getattr(ex, "is_concatenated", True):  # [g0, u0, g1, u1, ...] -> [gate; up]
            w_in = torch.cat([w_in[:, 0::2], w_in[:, 1::2]], dim=1)
            b_in = None if b_in is None else torch.cat([b_in[:, 0::2], b_in[:, 1::2]], dim=1)
        b_out = getattr(ex, "down_proj_bias", None)
        inter = int(w_out.shape[-1])
        spec = ExpertSpec(
            hidden=int(w_out.shape[1]), intermediate=inter, act="silu" if swiglu else _act_of(ex, preferred_act),
            glu=glu, bias=b_in is not None, **swiglu,
        )
        return ExpertParts(spec, w_in.detach(), w_out.detach(), _d(b_in), _d(b_out))
    mods = _expert_modules(ex)
    layout = _mlp_layout(mods[0])
    if layout is None:
        raise UnsupportedModelError(f"{type(mods[0]).__name__}: expert MLP has no known projection names")
    glu = len(layout) == 3
    lin: list[list[Any]] = [[getattr(m, n) for n in layout] for m in mods]
    w_in = torch.stack([torch.cat([x.weight for x in ls[:-1]], 0) if glu else ls[0].weight for ls in lin])
    w_out = torch.stack([ls[-1].weight for ls in lin])
    has_bias = lin[0][0].bias is not None
    b_in = torch.stack([torch.cat([x.bias for x in ls[:-1]], 0) for ls in lin]) if has_bias else None
    b_out = torch.stack([ls[-1].bias for ls in lin]) if has_bias else None
    spec = ExpertSpec(
        hidden=int(w_out.shape[1]), intermediate=int(w_out.shape[2]), act=_act_of(mods[0], preferred_act),
        glu=glu, bias=has_bias,
    )
    return ExpertParts(spec, w_in.detach(), w_out.detach(), _d(b_in), _d(b_out))


def _plain_gate(ex: nn.Module, preferred_act: str | None) -> bool:
    """Whether a class's own `_apply_gate` computes act(gate) * up all the same (Beam's, in float32)."""
    act = _attr([ex], *ACT_ATTRS)
    w = getattr(ex, "gate_up_proj", None)
    if act is None or not isinstance(w, torch.Tensor):
        return False
    two_i = int(w.shape[2] if getattr(ex, "is_transposed", False) else w.shape[1])
    try:
        name = activation_name(act, preferred_act)
        x = torch.randn(16, two_i, generator=torch.Generator().manual_seed(0)) * 4
        gate, up = x.chunk(2, dim=-1)
        with torch.no_grad():
            return bool(torch.equal(ex._apply_gate(x), ACT2FN[name](gate) * up))  # type: ignore[operator]
    except (UnsupportedModelError, RuntimeError, TypeError):
        return False


SWIGLU_LIMIT_ATTRS = ("swiglu_limit", "limit")
SWIGLU_ALPHA_ATTRS = ("swiglu_alpha", "alpha")


def _clamped_gate(ex: nn.Module) -> dict[str, Any] | None:
    """ExpertSpec's swiglu_* fields when a class's own `_apply_gate` is a clamped SwiGLU on [gate; up].

    DeepSeek-V4, HY-V4 and MiniMax-M3 clamp gate <= limit and up to [-limit, limit] before
    `silu(gate) * up` or gpt-oss's `gate * sigmoid(alpha * gate) * (up + 1)`. The limit and alpha are
    read from the module; beta (0 or 1) is not an attribute, so each is tried, and a candidate is kept
    only if it reproduces the gate on a probe that crosses the limit (the layer is then checked against
    the block as every conversion is).
    """
    from moeopt.ir.compute import clamped_swiglu

    w = getattr(ex, "gate_up_proj", None)
    limit, alpha = _attr([ex], *SWIGLU_LIMIT_ATTRS), _attr([ex], *SWIGLU_ALPHA_ATTRS, default=1.0)
    if not isinstance(w, torch.Tensor) or getattr(ex, "is_concatenated", True) is False:
        return None
    if not isinstance(limit, int | float) or isinstance(limit, bool) or not limit > 0:
        return None
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        return None
    two_i = int(w.shape[2] if getattr(ex, "is_transposed", False) else w.shape[1])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, two_i, generator=g) * torch.logspace(-1, 0, 32).unsqueeze(1) * 3 * float(limit)
    gate, up = x.chunk(2, dim=-1)
    try:
        with torch.no_grad():
            got = ex._apply_gate(x)  # type: ignore[operator]
    except (RuntimeError, TypeError, ValueError):
        return None
    if not isinstance(got, torch.Tensor) or got.shape != gate.shape:
        return None
    for beta in (0.0, 1.0):
        spec = ExpertSpec(
            hidden=1, intermediate=two_i // 2, act="silu", swiglu_alpha=float(alpha), swiglu_beta=beta,
            swiglu_limit=float(limit),
        )
        if torch.allclose(got, clamped_swiglu(gate, up, spec), rtol=1e-5, atol=1e-6):
            return {"swiglu_alpha": spec.swiglu_alpha, "swiglu_beta": beta, "swiglu_limit": spec.swiglu_limit}
    return None


def _d(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def find_router(block: nn.Module, num_experts: int, hidden: int) -> RouterParts:
    """The (E, H) router weight: a router child itself, or a Linear inside it (Switch, HunYuan)."""
    for name in ROUTER_NAMES:
        mod = getattr(block, name, None)
        if not isinstance(mod, nn.Module):
            continue
        for sub in [mod, *mod.modules()]:
            w = getattr(sub, "weight", None)
            if isinstance(w, torch.Tensor) and tuple(w.shape) == (num_experts, hidden):
                b = getattr(sub, "bias", None)
                sb = _score_bias([*mod.modules(), block], num_experts)
                return RouterParts(w.detach(), _d(b) if isinstance(b, torch.Tensor) else None, sb, mod)
    raise UnsupportedModelError(
        f"{type(block).__name__}: no router with an ({num_experts}, {hidden}) weight among children "
        f"{', '.join(ROUTER_NAMES)}"
    )


SCALE_NAMES = ("routed_scaling_factor", "route_scale", "router_scaling_factor", "moe_routed_scaling_factor")
SCORE_BIAS_NAMES = ("e_score_correction_bias", "expert_bias")


def _score_bias(objs: Sequence[Any], num_experts: int) -> torch.Tensor | None:
    """The (E,) bias added to the scores for the choice only, on the router or on the block (AFMoE)."""
    sb = _attr(objs, *SCORE_BIAS_NAMES)
    if not isinstance(sb, torch.Tensor) or sb.numel() != num_experts:
        return None
    return sb.detach().reshape(-1).float()


def extract_shared(block: nn.Module, hidden: int, preferred_act: str | None) -> list[DenseExpert]:
    """Shared experts (every token) with their optional sigmoid gate, as DenseExpert modules."""
    out = []
    gate = getattr(block, "shared_expert_gate", None)
    for name in SHARED_NAMES:
        m = getattr(block, name, None)
        if not isinstance(m, nn.Module):
            continue
        layout = _mlp_layout(m)
        if layout is None:
            fused = _fused_clamped_shared(m, hidden, isinstance(gate, nn.Linear))
            if fused is None:
                raise UnsupportedModelError(f"{type(block).__name__}.{name}: shared expert with unknown layout")
            out.append(fused)
            continue
        lin: list[Any] = [getattr(m, n) for n in layout]
        spec = SharedSpec(
            intermediate=int(lin[-1].weight.shape[1]), act=_act_of(m, preferred_act), glu=len(layout) == 3,
            bias=lin[0].bias is not None, gated=isinstance(gate, nn.Linear),
        )
        de = DenseExpert(spec, hidden)
        targets = ["gate_proj", "up_proj", "down_proj"] if spec.glu else ["up_proj", "down_proj"]
        with torch.no_grad():
            for t, src in zip(targets, lin, strict=True):
                getattr(de, t).weight = nn.Parameter(src.weight.detach(), requires_grad=False)
                if spec.bias:
                    getattr(de, t).bias = nn.Parameter(src.bias.detach(), requires_grad=False)
            if spec.gated:
                assert isinstance(gate, nn.Linear)
                de.gate.weight = nn.Parameter(gate.weight.detach(), requires_grad=False)
        out.append(de.requires_grad_(False))
    return out


def _fused_clamped_shared(m: nn.Module, hidden: int, gated: bool) -> DenseExpert | None:
    """A shared expert with one (2I, H) `gate_up_proj` Linear and a clamped SwiGLU (MiniMax-M3), or None.

    Its limit and alpha are read from the module and beta (0 or 1) tried; a candidate is kept only if it
    reproduces the module's output on a probe whose gate and up values cross the limit.
    """
    from moeopt.ir.compute import shared_expert

    gu, down = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
    limit = _attr([m], *SWIGLU_LIMIT_ATTRS)
    alpha = _attr([m], *SWIGLU_ALPHA_ATTRS, default=1.0)
    if gated or not (isinstance(gu, nn.Linear) and isinstance(down, nn.Linear)) or gu.out_features % 2:
        return None
    if not isinstance(limit, int | float) or isinstance(limit, bool) or not limit > 0:
        return None
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        return None
    inter = gu.out_features // 2
    if down.in_features != inter or (gu.bias is None) != (down.bias is None):
        return None
    x = torch.randn(16, hidden, generator=torch.Generator().manual_seed(0), dtype=gu.weight.dtype)
    with torch.no_grad():
        pre = F.linear(x, gu.weight, gu.bias)
        x = x * (3 * float(limit) / pre.abs().amax().clamp(min=1e-6))  # gate/up reach 3x the limit
        try:
            ref = m(x)
        except (RuntimeError, TypeError, ValueError):
            return None
    for beta in (0.0, 1.0):
        spec = SharedSpec(
            intermediate=inter, act="silu", bias=gu.bias is not None, swiglu_alpha=float(alpha),
            swiglu_beta=beta, swiglu_limit=float(limit),
        )
        de = DenseExpert(spec, hidden)
        with torch.no_grad():
            de.gate_proj.weight = nn.Parameter(gu.weight[:inter].detach(), requires_grad=False)
            de.up_proj.weight = nn.Parameter(gu.weight[inter:].detach(), requires_grad=False)
            de.down_proj.weight = nn.Parameter(down.weight.detach(), requires_grad=False)
            if spec.bias:
                de.gate_proj.bias = nn.Parameter(gu.bias[:inter].detach(), requires_grad=False)
                de.up_proj.bias = nn.Parameter(gu.bias[inter:].detach(), requires_grad=False)
                de.down_proj.bias = nn.Parameter(down.bias.detach(), requires_grad=False)
            got = shared_expert(x, de.flat_tensors(), spec)
        if isinstance(ref, torch.Tensor) and torch.allclose(got, ref, rtol=1e-5, atol=1e-6):
            return de.requires_grad_(False)
    return None


def router_candidates(block: nn.Module, router: RouterParts, config: Any, num_experts: int) -> list[RouterSpec]:
    """Plausible router semantics from the block's attributes, the likeliest first."""
    objs = [router.module, block, config]
    top_k = int(_attr(objs, "top_k", "num_experts_per_tok", "moe_topk", "num_selected_experts", default=1))
    norm_flag = _attr(objs, "norm_topk_prob")
    scale = float(_attr(objs, *SCALE_NAMES, default=1.0))
    n_group = int(_attr(objs, "num_group", "n_group", default=1) or 1)
    topk_group = int(_attr(objs, "topk_group", default=1) or 1)
    # A config may name groups that its router ignores (DeepSeek-V2's greedy top-k): try without too.
    groups = [(n_group, topk_group), (1, 1)] if n_group > 1 else [(1, 1)]
    scales = [scale, 1.0] if scale != 1.0 else [1.0]
    norm_min = float(_attr(objs, "norm_min", "moe_norm_min", default=1e-12))
    has_sb = router.score_bias is not None
    fns = ["sigmoid", "softmax"] if has_sb and n_group > 1 else ["softmax", "sigmoid"]
    fns.append("topk_softmax")
    norms: list[tuple[str, float]] = [("sum", 0.0), ("none", 0.0), ("sum_eps", 1e-20), ("clamp", norm_min)]
    if norm_flag is False:
        norms = [norms[1], norms[0], *norms[2:]]
    # With a score bias, sigmoid routers choose on scores + bias or (Kolibri) on logits + bias.
    on_logits = (False, True) if has_sb else (False,)
    cands = []
    for ol, (ng, tg), fn, sc, (norm, eps), sorted_topk in itertools.product(  # the usual choice first
        on_logits, groups, fns, scales, norms, (True, False)
    ):
        if ol and fn != "sigmoid":
            continue
        try:
            cands.append(RouterSpec(
                num_experts=num_experts, top_k=top_k, score_fn=fn, norm=norm, norm_eps=eps,  # type: ignore[arg-type]
                scale=sc, has_bias=router.bias is not None, has_score_bias=has_sb, n_group=ng, topk_group=tg,
                sorted_topk=sorted_topk, choice_on_logits=ol,
            ))
        except ValueError:
            continue
    return cands


SpecFn = Callable[[nn.Module, RouterParts, Any, int], RouterSpec]
ExpertsFn = Callable[[nn.Module, "str | None"], ExpertParts]


@dataclass(frozen=True)
class Adapter:
    """How one family of Hugging Face MoE blocks maps onto the IR.

    `router_spec` states the router semantics from the config; None means infer them by probing.
    `experts` reads the routed experts where `extract_experts` cannot (a custom gate, as gpt-oss's);
    `tuple_output`: the host unpacks the block's output as a pair (see MoELayer).
    """

    name: str
    block_classes: tuple[str, ...]
    router_spec: SpecFn | None = None
    doc: str = ""
    experts: ExpertsFn | None = None
    tuple_output: bool = False


def build_layer(
    block: nn.Module, adapter: Adapter, config: Any, *, index: int, path: str, check: bool,
    cached_spec: RouterSpec | None = None,
) -> MoELayer:
    """Convert one source block; probe it against the original unless check=False."""
    preferred = getattr(config, "hidden_act", None) or getattr(config, "dense_act_fn", None)
    ex = find_experts(block)
    if ex is None:
        raise UnsupportedModelError(f"{type(block).__name__}: no `experts` child")
    norms = [n for n, c in block.named_children() if "norm" in type(c).__name__.lower()]
    if norms:
        raise UnsupportedModelError(
            f"{type(block).__name__} at '{path}': a norm inside the MoE block ({', '.join(norms)}) is not in the IR"
        )
    experts = (adapter.experts or extract_experts)(ex, preferred)
    e = int(experts.w_in.shape[0])
    router = find_router(block, e, experts.spec.hidden)
    shared = extract_shared(block, experts.spec.hidden, preferred)
    if cached_spec is not None:
        cands = [cached_spec]
    elif adapter.router_spec is not None:
        cands = [adapter.router_spec(block, router, config, e)]
    else:
        cands = router_candidates(block, router, config, e)

    def make(spec: RouterSpec) -> MoELayer:
        table = ExpertTable(experts.spec, e, experts.w_in, experts.w_out, experts.b_in, experts.b_out)
        return MoELayer(
            spec, table, router.weight, router.bias, router.score_bias if spec.has_score_bias else None,
            shared, index=index, path=path, source_class=type(block).__name__, tuple_output=adapter.tuple_output,
        )

    if not check:
        return make(cands[0])
    probe = _probe_input(block, experts.spec.hidden, router.weight)
    best: tuple[float, MoELayer] | None = None
    with torch.no_grad():
        try:
            ref = _as_tensor(block(probe))
        except Exception as e:
            first = " ".join(str(e).split())[:120]
            raise UnsupportedModelError(
                f"{type(block).__name__} at '{path}': the block does not run on hidden states alone "
                f"({type(e).__name__}: {first}); not a self-contained MoE block"
            ) from e
        tol = 1e-5 * (1.0 + float(ref.abs().max()))
        for spec in cands:  # a bit-exact candidate wins at once; else the closest within tolerance
            layer = make(spec)
            diff = float((layer.moe(probe) - ref).abs().max())
            if diff == 0.0:
                return layer
            if best is None or diff < best[0]:
                best = (diff, layer)
    assert best is not None
    if best[0] <= tol:
        return best[1]
    worst = best[0]
    what = "its adapter's router semantics" if len(cands) == 1 else f"any of {len(cands)} router semantics tried"
    raise UnsupportedModelError(
        f"{type(block).__name__} at '{path}': canonical MoE layer with {what} does not reproduce the block "
        f"(best max abs diff {worst:.3g}); router {type(router.module).__name__}, experts {type(ex).__name__}"
    )


def _probe_input(block: nn.Module, hidden: int, router_w: torch.Tensor) -> torch.Tensor:
    """A fixed random (2, 8, H) input whose router logits are spread enough to separate semantics."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(2, 8, hidden, generator=g, dtype=torch.float32)
    scale = float(router_w.float().norm(dim=1).mean())
    x = x * (3.0 / scale) if scale > 0 else x  # logits ~ N(0, 3^2)
    return x.to(router_w.dtype)


def _as_tensor(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out
