"""Target profiles: the ONNX Runtime session settings an artifact records for the device it targets.

The settings live in the manifest, so any ORT binding (C, C++, Java, Python) can open the model the
way moeopt measured it. Keys not known to a build are ignored by ORT's config-entry map.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moeopt.errors import BadInputError

TARGETS = ("x86_64", "arm64")


@dataclass(frozen=True)
class TargetProfile:
    """Session settings for one target."""

    target: str
    intra_op_threads: int  # 0 = ORT picks (all physical cores)
    inter_op_threads: int = 1  # decoders are one chain of ops: no parallel branches worth a pool
    graph_optimization_level: str = "extended"  # portable; "all" adds hardware-specific layouts
    execution_mode: str = "sequential"
    config: dict[str, str] = field(default_factory=dict)  # session config entries
    providers: tuple[str, ...] = ("CPUExecutionProvider",)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target, "intra_op_threads": self.intra_op_threads,
            "inter_op_threads": self.inter_op_threads, "graph_optimization_level": self.graph_optimization_level,
            "execution_mode": self.execution_mode, "config": dict(self.config), "providers": list(self.providers),
        }


def profile(target: str, threads: int = 0) -> TargetProfile:
    """The profile of `target` (x86_64 or arm64); `threads` overrides the intra-op thread count."""
    if target == "x86_64":
        # Servers and laptops: spin-waiting threads cut per-op latency at the cost of idle CPU.
        return TargetProfile("x86_64", threads, config={"session.intra_op.allow_spinning": "1"})
    if target == "arm64":
        # Boards (Raspberry Pi, Jetson CPU): 4 big cores, no spinning (power, thermal throttling);
        # bf16 fast-math GEMM stays off because it changes results beyond the parity tolerance.
        return TargetProfile(
            "arm64", threads or 4,
            config={"session.intra_op.allow_spinning": "0", "mlas.enable_gemm_fastmath_arm64_bfloat16": "0"},
        )
    raise BadInputError(f"unknown target '{target}'; targets: {', '.join(TARGETS)}")
