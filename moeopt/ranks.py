"""Whether this process is one rank of a torchrun job, from the environment alone.

Kept apart from `moeopt.distributed` (which imports torch) because the CLI asks it before every command,
runtime-only installs included, where torch is absent.
"""

from __future__ import annotations

import os

ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # what torchrun sets for each worker


def launched() -> bool:
    """Whether this process was started by torchrun (or anything that sets its environment variables)."""
    return all(os.environ.get(k) for k in ENV)


def launched_world() -> int:
    """WORLD_SIZE from the environment (1 when not launched)."""
    return int(os.environ.get("WORLD_SIZE", "1")) if launched() else 1
