"""A moeopt checkpoint's bytes do not depend on the process that wrote it (reproducible output)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

SAVE = """
import sys, pathlib, torch
from moeopt.ir.checkpoint import _save_shards
torch.manual_seed(0)
tensors = {"a.weight": torch.randn(4, 3), "b.weight": torch.randn(2)}
_save_shards(tensors, torch.float32, pathlib.Path(sys.argv[1]), 1 << 30)
"""


def test_safetensors_bytes_equal_across_processes(tmp_path: Path) -> None:
    # Before the fix, safetensors wrote the two __metadata__ keys in a per-process hash order: about half of
    # the processes wrote each order, so four saves all agreeing had a chance of 1 in 8.
    digests = set()
    for i in range(4):
        out = tmp_path / str(i)
        out.mkdir()
        subprocess.run([sys.executable, "-c", SAVE, str(out)], check=True)
        digests.add(hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
