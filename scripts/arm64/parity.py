#!/usr/bin/env python3
"""Run scripts/run_artifact.py --parity in this interpreter, after one line saying where it runs.

    python3 scripts/arm64/parity.py ARTIFACT [run_artifact options...]

Used by scripts/arm64/test.sh under qemu-aarch64-static: the first line shows platform.machine()
(aarch64 under emulation), the Python and the onnxruntime/numpy versions, so the log proves which
wheels and which architecture ran the parity check. Needs only numpy and onnxruntime, like
run_artifact.py. The exit status is run_artifact.py's (0 pass, 1 mismatch, 2 bad artifact).
"""

from __future__ import annotations

import platform
import runpy
import sys
from pathlib import Path

RUN_ARTIFACT = Path(__file__).resolve().parents[1] / "run_artifact.py"


def main() -> int:
    import numpy as np
    import onnxruntime as ort

    print(
        f"platform: {platform.machine()} python {platform.python_version()} "
        f"onnxruntime {ort.__version__} numpy {np.__version__}",
        flush=True,
    )
    sys.argv = [str(RUN_ARTIFACT), *sys.argv[1:], "--parity"]
    try:
        runpy.run_path(str(RUN_ARTIFACT), run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
