"""The canonical MoE layer's forward as one pure function of tensors.

It is the single definition of the layer's numerics: `MoELayer.forward` calls it in eager mode and the
`moeopt::moe_layer` custom op (what `trace` and the lowering see) wraps it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from moeopt.ir.routing import apply_capacity, route
from moeopt.ir.spec import ExpertSpec, RouterSpec, SharedSpec


@dataclass
class RoutingTrace:
    """What the router did for a batch, handed to observers (importance, routing reports)."""

    logits: torch.Tensor  # (N, E) router logits, N = B*T tokens
    index: torch.Tensor  # (N, k) chosen original experts
    weights: torch.Tensor  # (N, k) their weights
    hidden: torch.Tensor  # (N, H) the layer's input


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, spec: ExpertSpec | SharedSpec) -> torch.Tensor:
    """gpt-oss's gate (see ExpertSpec): min(gate, limit) * sigmoid(alpha * .) * (clamp(up) + beta), in
    the operation order of transformers' `GptOssExperts._apply_gate`."""
    lim = spec.swiglu_limit
    if lim is not None:
        gate = gate.clamp(min=None, max=lim)
        up = up.clamp(min=-lim, max=lim)
    glu = gate * torch.sigmoid(gate * spec.swiglu_alpha)
    return (up + spec.swiglu_beta) * glu


def _dense(
    x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, b_in: torch.Tensor | None,
    b_out: torch.Tensor | None, act: str, glu: bool, spec: ExpertSpec | None = None,
) -> torch.Tensor:
    """One expert on its tokens: `down(act(gate x) * up x)` or `wo(act(wi x))`; the fused in-projection
    mirrors transformers' `linear(x, gate_up_proj[e]).chunk(2)` so the rounding is the same. `spec`
    is needed only for clamped-SwiGLU experts (its alpha, beta and limit; biases added as gpt-oss does)."""
    h = expert_hidden(x, w_in, b_in, act, glu, spec)
    if spec is not None and spec.clamped_swiglu:  # gpt-oss adds its biases after each matmul (bf16 rounding)
        return F.linear(h, w_out) + b_out if b_out is not None else F.linear(h, w_out)
    return F.linear(h, w_out, b_out)


def expert_hidden(
    x: torch.Tensor, w_in: torch.Tensor, b_in: torch.Tensor | None, act: str, glu: bool,
    spec: ExpertSpec | None = None,
) -> torch.Tensor:
    """An expert's intermediate activation (N, I): the input of its down projection (see `_dense`)."""
    if spec is not None and spec.clamped_swiglu:
        h = F.linear(x, w_in) + b_in if b_in is not None else F.linear(x, w_in)
        gate, up = h.chunk(2, dim=-1)
        return clamped_swiglu(gate, up, spec)
    h = F.linear(x, w_in, b_in)
    if glu:
        gate, up = h.chunk(2, dim=-1)
        return ACT2FN[act](gate) * up
    return ACT2FN[act](h)


def routed_experts(
    x: torch.Tensor,  # (N, H)
    slot_idx: torch.Tensor,  # (N, k) physical slot of each choice, -1 = none
    weights: torch.Tensor,  # (N, k)
    w_in: torch.Tensor,  # (S, F, H)
    w_out: torch.Tensor,  # (S, H, I)
    b_in: torch.Tensor | None,
    b_out: torch.Tensor | None,
    spec: ExpertSpec,
) -> torch.Tensor:
    """Sum over each token's chosen slots of weight * expert(x); choices sharing a slot add their weights."""
    out = torch.zeros_like(x)
    for s in torch.unique(slot_idx[slot_idx >= 0]).tolist():  # ascending, like transformers' expert loop
        hit = slot_idx == s  # (N, k)
        # Rows in transformers' order (by choice rank, then token): GEMM rounding depends on a row's
        # position in the block, so this order is what makes an unpruned layer bit-identical.
        tok = torch.where(hit.t())[1]  # (n,)
        if tok.numel() != int(hit.any(dim=-1).sum()):  # a token chose two experts merged into slot s
            tok = torch.tensor(list(dict.fromkeys(tok.tolist())), dtype=torch.long, device=x.device)
        w = torch.where(hit[tok], weights[tok], 0.0).sum(dim=-1)  # (n,)
        y = _dense(
            x[tok], w_in[s], w_out[s], None if b_in is None else b_in[s], None if b_out is None else b_out[s],
            spec.act, spec.glu, spec,
        )
        out.index_add_(0, tok, (y * w[:, None]).to(out.dtype))
    return out


def shared_expert(x: torch.Tensor, tensors: list[torch.Tensor], spec: SharedSpec) -> torch.Tensor:
    """A dense shared expert, from its flat tensor list (see `shared_tensor_names`)."""
    it = iter(tensors)
    if spec.glu:
        wg, wu = next(it), next(it)
        bg, bu = (next(it), next(it)) if spec.bias else (None, None)
        if spec.clamped_swiglu:
            h = clamped_swiglu(F.linear(x, wg, bg), F.linear(x, wu, bu), spec)
        else:
            h = ACT2FN[spec.act](F.linear(x, wg, bg)) * F.linear(x, wu, bu)
    else:
        wi = next(it)
        bi = next(it) if spec.bias else None
        h = ACT2FN[spec.act](F.linear(x, wi, bi))
    wd = next(it)
    bd = next(it) if spec.bias else None
    y = F.linear(h, wd, bd)
    if spec.gated:
        y = torch.sigmoid(F.linear(x, next(it))) * y
    return y


def shared_tensor_names(spec: SharedSpec) -> list[str]:
    """The order in which a shared expert's tensors are passed around (module attribute names)."""
    names = ["gate_proj.weight", "up_proj.weight"] if spec.glu else ["up_proj.weight"]
    if spec.bias:
        names += ["gate_proj.bias", "up_proj.bias"] if spec.glu else ["up_proj.bias"]
    names.append("down_proj.weight")
    if spec.bias:
        names.append("down_proj.bias")
    if spec.gated:
        names.append("gate.weight")
    return names


def moe_compute(
    x: torch.Tensor,  # (B, T, H)
    router_w: torch.Tensor,  # (E, H)
    router_b: torch.Tensor | None,  # (E,)
    score_bias: torch.Tensor | None,  # (E,)
    keep_mask: torch.Tensor,  # (E,) bool
    slot_of: torch.Tensor,  # (E,) int64
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    b_in: torch.Tensor | None,
    b_out: torch.Tensor | None,
    shared: list[torch.Tensor],
    router: RouterSpec,
    experts: ExpertSpec,
    shared_specs: tuple[SharedSpec, ...],
) -> tuple[torch.Tensor, RoutingTrace]:
    """The whole layer: route, run the chosen slots, add the shared experts."""
    batch, hid = x.shape[0], x.shape[-1]
    flat = x.reshape(-1, hid)  # (N, H)
    if router.logits_fp32:
        logits = F.linear(flat.float(), router_w.float(), None if router_b is None else router_b.float())
    else:
        logits = F.linear(flat, router_w, router_b)
    weights, index = route(logits, router, keep_mask, score_bias)  # (N, k) each
    if router.capacity is not None:
        weights = apply_capacity(index, weights, batch, router.capacity, router.num_experts)
    out = routed_experts(flat, slot_of[index], weights.to(x.dtype), w_in, w_out, b_in, b_out, experts)
    pos = 0
    for spec in shared_specs:
        n = len(shared_tensor_names(spec))
        out = out + shared_expert(flat, shared[pos : pos + n], spec)
        pos += n
    return out.reshape(x.shape), RoutingTrace(logits, index, weights, flat)
