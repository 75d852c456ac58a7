"""moeopt: a compiler for Mixture-of-Experts language models.

The IR names (`load`, `MoEModel`, ...) are imported on first use, so that `moeopt.runtime` (serving an
artifact with ONNX Runtime) runs without importing torch or transformers: on a device their ~300 MB of
memory would dwarf an offloaded model's expert budget.
"""

from typing import TYPE_CHECKING, Any

from moeopt.errors import (
    BadInputError,
    InfeasibleBudgetError,
    MoeOptError,
    PassError,
    UnsupportedModelError,
    VerificationError,
)

if TYPE_CHECKING:
    from moeopt.ir import MoELayer, MoEModel, check, load, moe_nodes, trace, verify

__version__ = "0.1.0"

_IR_NAMES = ("MoELayer", "MoEModel", "check", "load", "moe_nodes", "trace", "verify")


def __getattr__(name: str) -> Any:
    if name in _IR_NAMES:
        import moeopt.ir

        return getattr(moeopt.ir, name)
    raise AttributeError(f"module 'moeopt' has no attribute {name!r}")


__all__ = [
    "BadInputError",
    "InfeasibleBudgetError",
    "MoELayer",
    "MoEModel",
    "MoeOptError",
    "PassError",
    "UnsupportedModelError",
    "VerificationError",
    "__version__",
    "check",
    "load",
    "moe_nodes",
    "trace",
    "verify",
]
