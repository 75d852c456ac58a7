"""What the reference-model quality benches (apps, compression, predictor, quantize) share."""

from __future__ import annotations

import argparse
from pathlib import Path

from moeopt.data.apps import default_data_root
from moeopt.demo import REFERENCE


def reference_parser(doc: str | None, out: str) -> argparse.ArgumentParser:
    """A parser described by the first line of `doc`, with the options every such bench takes: --model
    (default: the embedded reference model), --data (the data root) and --out (default `out`)."""
    p = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    p.add_argument("--model", type=Path, default=REFERENCE)
    p.add_argument("--data", type=Path, default=default_data_root())
    p.add_argument("--out", type=Path, default=Path(out))
    return p
