"""Router semantics of the canonical MoE layer: logits -> (top-k experts, weights).

One pure function per score function, written to reproduce the Hugging Face implementations operation
for operation so that an unpruned layer is bit-identical to its source in fp32.
"""

from __future__ import annotations

import torch

from moeopt.ir.spec import RouterSpec


def _normalise(w: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    if spec.norm == "sum":
        w = w / w.sum(dim=-1, keepdim=True)
    elif spec.norm == "sum_eps":
        w = w / (w.sum(dim=-1, keepdim=True) + spec.norm_eps)
    elif spec.norm == "clamp":
        w = w / torch.clamp(w.sum(dim=-1, keepdim=True), min=spec.norm_eps)
    if spec.scale != 1.0:
        w = w * spec.scale
    return w


def _group_limit(choice: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """DeepSeek-V3's group-limited choice: keep only the best `topk_group` groups of experts."""
    if spec.n_group <= 1:
        return choice
    t, e = choice.shape
    group_scores = choice.view(t, spec.n_group, e // spec.n_group).topk(2, dim=-1)[0].sum(dim=-1)  # (T, G)
    group_idx = torch.topk(group_scores, k=spec.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, spec.n_group, e // spec.n_group).reshape(-1, e)
    return choice.masked_fill(~score_mask.bool(), float("-inf"))


def _sparsemixer_eval(scores: torch.Tensor, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's sparsemixer in eval mode (no Gumbel sampling), as transformers computes it."""
    thr, max_ind = scores.max(dim=-1, keepdim=True)
    factor = scores.abs().clamp(min=thr)
    masked = scores.masked_fill(((thr - scores) / factor) > (2 * jitter_eps), float("-inf"))
    mult1 = torch.softmax(masked, dim=-1).gather(dim=-1, index=max_ind)
    masked_scores = torch.scatter(scores, -1, max_ind, float("-inf"))
    thr2, max_ind2 = masked_scores.max(dim=-1, keepdim=True)
    factor2 = scores.abs().clamp(min=thr2)
    masked2 = masked_scores.masked_fill(((thr2 - scores) / factor2) > (2 * jitter_eps), float("-inf"))
    mult2 = torch.softmax(masked2, dim=-1).gather(dim=-1, index=max_ind2)
    return torch.cat((mult1, mult2), dim=-1), torch.cat((max_ind, max_ind2), dim=-1)


def route(
    logits: torch.Tensor,  # (T, E) router logits
    spec: RouterSpec,
    keep_mask: torch.Tensor,  # (E,) bool: False = pruned, never chosen
    score_bias: torch.Tensor | None = None,  # (E,) choice-only bias
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose the top-k kept experts of every token.

    Returns:
        (weights, index), both (T, k); weights in float32, index int64 over the ORIGINAL experts.
    """
    neg_inf = float("-inf")
    if spec.score_fn == "softmax":
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # (T, E)
        choice = probs + score_bias if score_bias is not None else probs
        choice = _group_limit(choice.masked_fill(~keep_mask, neg_inf), spec)
        index = torch.topk(choice, spec.top_k, dim=-1, sorted=spec.sorted_topk)[1]
        weights = probs.gather(1, index)
    elif spec.score_fn == "sigmoid":
        scores = logits.sigmoid()
        base = logits.float() if spec.choice_on_logits else scores
        choice = base + score_bias if score_bias is not None else base
        choice = _group_limit(choice.masked_fill(~keep_mask, neg_inf), spec)
        index = torch.topk(choice, spec.top_k, dim=-1, sorted=spec.sorted_topk)[1]
        weights = scores.gather(1, index)
    elif spec.score_fn == "topk_softmax":
        chosen, index = torch.topk(logits.float().masked_fill(~keep_mask, neg_inf), spec.top_k, dim=-1)
        weights = torch.softmax(chosen, dim=-1)
    else:  # sparsemixer
        weights, index = _sparsemixer_eval(logits.masked_fill(~keep_mask, neg_inf), spec.jitter_eps)
    return _normalise(weights, spec), index


def apply_capacity(
    index: torch.Tensor,  # (B*T, k)
    weights: torch.Tensor,  # (B*T, k)
    batch: int,
    capacity: int,
    num_experts: int,
) -> torch.Tensor:
    """Switch Transformers' capacity: zero the weight of a token past its expert's capacity.

    Counted per sequence in token order, like transformers' cumsum over the sequence dimension.
    """
    onehot = torch.nn.functional.one_hot(index, num_experts).view(batch, -1, index.shape[-1], num_experts)
    priority = torch.cumsum(onehot.sum(dim=2), dim=1)  # (B, T, E) tokens routed so far per expert
    pos = torch.gather(priority.view(-1, num_experts), 1, index)  # (B*T, k)
    return weights.masked_fill(pos > capacity, 0.0)
