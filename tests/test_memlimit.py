"""bench/memlimit.py: a command under a memory limit reports its peak, and an OOM kill is reported, not hidden.

The cgroup cases need a writable memory controller (root here: cgroup v1); elsewhere they are skipped
and only the named substitute (RLIMIT_AS) is tested. Each run is a small python process (< 1 s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import memlimit  # bench/ is a folder of scripts, not a package

MIB = 2**20
ALLOC = "import sys; b = bytearray(int(sys.argv[1]) << 20); b[::4096] = b'x' * len(b[::4096]); print('done')"


def _cgroup_writable() -> bool:
    try:
        group, _ = memlimit.make_group(64 * MIB, None, None, f"moeopt-memlimit-probe-{os.getpid()}")
    except SystemExit:
        return False
    if group is None:
        return False
    group.remove()
    return True


CGROUP = _cgroup_writable()


@pytest.mark.skipif(not CGROUP, reason="no writable memory cgroup (v1 or v2) here")
def test_a_cgroup_limit_reports_the_peak_and_an_oom_kill(tmp_path: Path) -> None:
    model = tmp_path / "model.bin"
    model.write_bytes(os.urandom(8 * MIB))
    ok = memlimit.run_limited([sys.executable, "-c", ALLOC, "16"], 96 * MIB, drop=[tmp_path],
                              stdout=subprocess.DEVNULL)
    assert ok["controller"] in ("cgroup-v1", "cgroup-v2") and "substitute" not in ok
    assert ok["returncode"] == 0 and not ok["oom_killed"] and ok["wall_s"] > 0
    assert 16 * MIB <= ok["peak_bytes"] <= 96 * MIB  # the 16 MiB it touched counts, within the limit
    assert ok["dropped"] == {"how": "posix_fadvise(DONTNEED)", "files": 1, "bytes": 8 * MIB,
                             "drop_caches_writable": ok["dropped"]["drop_caches_writable"]}
    assert not Path(ok["cgroup"]).exists()  # the group goes with the run

    killed = memlimit.run_limited([sys.executable, "-c", ALLOC, "200"], 64 * MIB, stdout=subprocess.DEVNULL)
    assert killed["oom_killed"] and killed["signal"] == "SIGKILL" and killed["returncode"] == -9
    assert killed["peak_bytes"] <= 64 * MIB and memlimit.exit_status(killed) == 137


def test_the_substitute_is_named_when_asked_for(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    code = memlimit.main(["--limit", "300MiB", "--controller", "rlimit-as", "--json", str(out), "--",
                          sys.executable, "-c", ALLOC, "600"])
    res = json.loads(out.read_text())
    assert res["controller"] == "rlimit-as" and "page cache is not counted" in res["substitute"]
    assert res["cgroup"] is None and res["returncode"] == 1 and code == 1  # MemoryError in the command
