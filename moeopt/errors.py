"""The error taxonomy a user sees: one line that says what was wrong and what to do.

Every error moeopt raises on purpose derives from `MoeOptError`; the CLI prints its message on one line
and exits with code 2. Anything else is a bug and is reported as an internal error.
"""

from __future__ import annotations


class MoeOptError(Exception):
    """Base of every deliberate moeopt error; `str(err)` is the one-line message."""

    kind = "error"

    def __init__(self, message: str) -> None:
        # Multi-line messages break the one-line promise; fold them.
        super().__init__(" ".join(message.split()))


class BadInputError(MoeOptError):
    """A missing, corrupt or malformed input: checkpoint, data file, option value, pipeline text."""

    kind = "bad input"


class UnsupportedModelError(MoeOptError):
    """The model loads but moeopt cannot map it onto its IR (no MoE blocks, unknown block structure)."""

    kind = "unsupported model"


class InfeasibleBudgetError(MoeOptError):
    """A memory/latency/bit budget that no choice of the pass can meet."""

    kind = "infeasible budget"


class VerificationError(MoeOptError):
    """An invariant is broken: the IR's (the message names the layer, the expert and the invariant), or a
    lowered artifact's parity with its model (the message names the measured difference and the tolerance)."""

    kind = "verifier"


class PassError(MoeOptError):
    """A pass failed; the message starts with the pass name."""

    kind = "pass failure"

    def __init__(self, pass_name: str, message: str) -> None:
        self.pass_name = pass_name
        super().__init__(f"pass '{pass_name}': {message}")


class DistributedError(MoeOptError):
    """A distributed run (torchrun) could not start, or a rank lost contact with the others."""

    kind = "distributed"
