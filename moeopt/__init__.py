"""moeopt: a compiler for Mixture-of-Experts language models."""

from moeopt.errors import (
    BadInputError,
    InfeasibleBudgetError,
    MoeOptError,
    PassError,
    UnsupportedModelError,
    VerificationError,
)
from moeopt.ir import MoELayer, MoEModel, check, load, moe_nodes, trace, verify

__version__ = "0.1.0"

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
