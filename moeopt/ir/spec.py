"""Frozen, self-checking descriptions of a canonical MoE layer's router and experts."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

ScoreFn = Literal["softmax", "sigmoid", "topk_softmax", "sparsemixer"]
NormMode = Literal["none", "sum", "sum_eps", "clamp"]

SCORE_FNS: tuple[str, ...] = ("softmax", "sigmoid", "topk_softmax", "sparsemixer")
NORM_MODES: tuple[str, ...] = ("none", "sum", "sum_eps", "clamp")


@dataclass(frozen=True)
class RouterSpec:
    """How a layer turns router logits into top-k experts and their weights.

    The router computes `logits = x @ W.T (+ b)`; then, by `score_fn`:
      softmax:      probs = softmax(logits); choose top-k of probs (+ bias); weights = chosen probs
      sigmoid:      scores = sigmoid(logits); choose top-k of scores + bias (group-limited if
                    n_group > 1), or of logits + bias with choice_on_logits; weights = chosen scores
                    (DeepSeek-V3, GLM-4-MoE; Kolibri chooses on logits)
      topk_softmax: choose top-k logits; weights = softmax over the chosen logits (GraniteMoE)
      sparsemixer:  PhiMoE's eval-mode sparsemixer (top-2 with a jitter threshold)
    then `norm` rescales the weights (none, w/sum, w/(sum+eps), w/max(sum, eps)) and `scale`
    multiplies them. `capacity` (Switch) drops tokens past an expert's capacity within a sequence.
    Pruned experts get -inf before any top-k, so the weights of kept experts are unchanged.
    """

    num_experts: int  # E: router width, the number of ORIGINAL experts (never changes with pruning)
    top_k: int
    score_fn: ScoreFn = "softmax"
    norm: NormMode = "none"
    norm_eps: float = 0.0  # eps of sum_eps / clamp
    scale: float = 1.0  # routed_scaling_factor
    has_bias: bool = False  # router linear bias (Switch with router_bias)
    has_score_bias: bool = False  # score-correction bias added for the choice only (DeepSeek-V3, Ernie)
    n_group: int = 1  # group-limited top-k: experts split in n_group groups ...
    topk_group: int = 1  # ... and only the best topk_group groups compete
    sorted_topk: bool = True  # torch.topk(sorted=...) as the source does, so the sum order matches
    capacity: int | None = None  # Switch expert capacity per sequence; None = no dropping
    jitter_eps: float = 0.0  # sparsemixer's threshold
    logits_fp32: bool = True  # compute router logits in float32 whatever the model dtype
    choice_on_logits: bool = False  # sigmoid: choose top-k of logits (+ bias), not of scores (+ bias) (Kolibri)

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in 1..{self.num_experts}, got {self.top_k}")
        if self.score_fn not in SCORE_FNS:
            raise ValueError(f"unknown score_fn {self.score_fn!r}; expected one of {SCORE_FNS}")
        if self.norm not in NORM_MODES:
            raise ValueError(f"unknown norm {self.norm!r}; expected one of {NORM_MODES}")
        if self.n_group < 1 or self.num_experts % self.n_group:
            raise ValueError(f"n_group={self.n_group} must divide num_experts={self.num_experts}")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group={self.topk_group} must be in 1..n_group={self.n_group}")
        if self.score_fn == "sparsemixer" and self.top_k != 2:
            raise ValueError("sparsemixer routing is defined for top_k=2 only")
        if self.capacity is not None and self.capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {self.capacity}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RouterSpec:
        return cls(**d)


@dataclass(frozen=True)
class ExpertSpec:
    """The shape and function of one layer's routed experts.

    GLU experts compute `down(act(gate x) * up x)` and store `w_in = [gate; up]` as (2I, H);
    MLP experts compute `wo(act(wi x))` and store `w_in = wi` as (I, H). `w_out` is (H, I).

    SiLU-gated GLU experts may use the clamped SwiGLU of gpt-oss (and of ORT's MoE/QMoE `swiglu`,
    attributes activation_alpha / activation_beta / swiglu_limit): with g = min(gate, limit) and
    u = clamp(up, -limit, limit), the product is `g * sigmoid(alpha * g) * (u + beta)`. The defaults
    (alpha 1, beta 0, no limit) are the plain `silu(gate) * up`.
    """

    hidden: int  # H
    intermediate: int  # I
    act: str  # a key of transformers.activations.ACT2FN, so numerics match the source exactly
    glu: bool = True
    bias: bool = False  # experts carry b_in / b_out
    swiglu_alpha: float = 1.0  # gate * sigmoid(alpha * gate)
    swiglu_beta: float = 0.0  # (up + beta)
    swiglu_limit: float | None = None  # gate clamped to <= limit, up to [-limit, limit]; None: no clamp

    def __post_init__(self) -> None:
        if self.hidden < 1 or self.intermediate < 1:
            raise ValueError(f"hidden and intermediate must be >= 1, got {self.hidden}, {self.intermediate}")
        from transformers.activations import ACT2CLS

        if self.act not in ACT2CLS:
            raise ValueError(f"unknown activation {self.act!r}")
        _check_swiglu(self)

    @property
    def clamped_swiglu(self) -> bool:
        """Whether the GLU is not the plain `act(gate) * up` (alpha, beta or limit set, as gpt-oss)."""
        return _is_clamped(self)

    @property
    def in_rows(self) -> int:
        """Rows of w_in: 2I for GLU experts (gate then up), I otherwise."""
        return 2 * self.intermediate if self.glu else self.intermediate

    def to_dict(self) -> dict[str, Any]:
        """The fields; the SwiGLU parameters only where set, so plain specs serialise as before."""
        d = dataclasses.asdict(self)
        if not self.clamped_swiglu:
            for k in ("swiglu_alpha", "swiglu_beta", "swiglu_limit"):
                del d[k]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExpertSpec:
        return cls(**d)


@dataclass(frozen=True)
class SharedSpec:
    """A dense expert every token goes through, optionally scaled by sigmoid(x @ g) (Qwen2-MoE).

    A SiLU-gated GLU shared expert may use the clamped SwiGLU as ExpertSpec describes (MiniMax-M3).
    """

    intermediate: int
    act: str
    glu: bool = True
    bias: bool = False
    gated: bool = False
    swiglu_alpha: float = 1.0
    swiglu_beta: float = 0.0
    swiglu_limit: float | None = None

    def __post_init__(self) -> None:
        _check_swiglu(self)

    @property
    def clamped_swiglu(self) -> bool:
        """Whether the GLU is not the plain `act(gate) * up` (see ExpertSpec)."""
        return _is_clamped(self)

    def to_dict(self) -> dict[str, Any]:
        """The fields; the SwiGLU parameters only where set, so plain specs serialise as before."""
        d = dataclasses.asdict(self)
        if not self.clamped_swiglu:
            for k in ("swiglu_alpha", "swiglu_beta", "swiglu_limit"):
                del d[k]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SharedSpec:
        return cls(**d)


def spec_key(router: RouterSpec, experts: ExpertSpec, shared: tuple[SharedSpec, ...]) -> str:
    """A canonical string for the custom op's static attribute (sorted JSON)."""
    return json.dumps(
        {"router": router.to_dict(), "experts": experts.to_dict(), "shared": [s.to_dict() for s in shared]},
        sort_keys=True,
    )


def _is_clamped(spec: ExpertSpec | SharedSpec) -> bool:
    return spec.swiglu_alpha != 1.0 or spec.swiglu_beta != 0.0 or spec.swiglu_limit is not None


def _check_swiglu(spec: ExpertSpec | SharedSpec) -> None:
    """The clamped-SwiGLU fields of an expert or shared-expert spec are valid (shared by both specs)."""
    if _is_clamped(spec) and not (spec.glu and spec.act in ("silu", "swish")):
        raise ValueError("swiglu_alpha / swiglu_beta / swiglu_limit apply to SiLU-gated GLU experts only")
    if spec.swiglu_limit is not None and not spec.swiglu_limit > 0:
        raise ValueError(f"swiglu_limit must be > 0, got {spec.swiglu_limit}")
