"""Run a command as if on a board with only so much memory: a memory cgroup at a limit, page cache included.

    PYTHONPATH=. .venv/bin/python bench/memlimit.py --limit 2GiB --drop ART [--json out.json] -- CMD ARGS...

On a board, the page cache of a model file competes with the process for the same RAM; a memory cgroup
charges both to the group, so a limit below the model's size reproduces that on a bigger machine
(llama.cpp's mmap then thrashes as it would, and an offload cache's reads go to storage). Before each
run the page cache of the `--drop` files (folders: every file under them) is dropped, so the run starts
cold as after a boot and the first reads are charged to the group, not to whoever cached them earlier:
``posix_fadvise(POSIX_FADV_DONTNEED)`` on each file (no root needed; pages another process has mapped
stay), and ``/proc/sys/vm/drop_caches`` only with ``--drop-all`` (it drops every cache of the machine,
other people's too).

Controllers, tried in order (``--controller`` picks one):

* ``cgroup-v1``: a group made under the v1 memory hierarchy (``/sys/fs/cgroup/memory``) with
  ``memory.limit_in_bytes`` (and ``memory.memsw.limit_in_bytes`` where swap is accounted, so swap does
  not stretch the limit); the peak is ``memory.max_usage_in_bytes``, OOM kills are ``oom_kill`` in
  ``memory.oom_control``.
* ``cgroup-v2``: a group made in the cgroup2 mount whose ``cgroup.controllers`` has ``memory``, with
  ``memory.max`` (and ``memory.swap.max`` 0); the peak is ``memory.peak`` (Linux 5.19+; else the
  largest ``memory.current`` polled), OOM kills are ``oom_kill`` in ``memory.events``.
* ``rlimit-as``: where neither can be written, the closest honest substitute: ``RLIMIT_AS`` at the
  limit. It caps the process's address space, not its resident memory, and the page cache is NOT
  counted; the JSON says so (``substitute``), and the peak is the process's max RSS.

The group is made for the run (the command is moved into it before it execs) and removed after it.
A page is charged to the group that first brought it into memory: the pages of shared libraries that
other processes already have cached or mapped (python, onnxruntime) are not charged to this group, so
its peak can be below the command's RSS; the files named with ``--drop`` (the model) are charged to the
run that reads them, which is what the limit is about.
The JSON (stdout, or ``--json``) holds the limit, controller, peak memory (the group's, page cache
included, and the command's peak RSS, its VmHWM polled every 10 ms), wall time, exit status, signal, OOM kills and the
group's ``memory.stat`` at exit; an OOM kill is reported (``oom_killed``), and this script then exits
with the command's status (128 + signal for a signal), never 0. `run_limited` is the same as a function,
for benches that run each engine at several limits.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

V1_ROOT = Path("/sys/fs/cgroup/memory")
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
CONTROLLERS = ("cgroup-v1", "cgroup-v2", "rlimit-as")
_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "kb": 10**3, "m": 2**20, "mib": 2**20, "mb": 10**6,
          "g": 2**30, "gib": 2**30, "gb": 10**9}


def parse_size(text: str) -> int:
    """'2GiB' -> 2147483648, '300MB' -> 300000000, '4096' -> 4096."""
    t = text.strip().lower()
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):]
    if not num or unit not in _UNITS:
        raise SystemExit(f"memlimit: not a size: {text!r} (e.g. 2GiB, 300MB, 4096)")
    return int(float(num) * _UNITS[unit])


# ---- page cache -----------------------------------------------------------------------------------

def files_under(paths: Iterable[str | Path]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        out += sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    return out


def drop_page_cache(paths: Iterable[str | Path], drop_all: bool = False) -> dict[str, Any]:
    """Evict the files' pages from the page cache; returns what was done, for the JSON."""
    files = files_under(paths)
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped (Linux syncs a read-only descriptor too)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    done: dict[str, Any] = {"how": "posix_fadvise(DONTNEED)", "files": len(files),
                            "bytes": sum(f.stat().st_size for f in files),
                            "drop_caches_writable": os.access(DROP_CACHES, os.W_OK)}
    if drop_all:
        with DROP_CACHES.open("w") as fh:
            fh.write("1\n")
        done["how"] += " + /proc/sys/vm/drop_caches"
    return done


# ---- controllers ----------------------------------------------------------------------------------

def _write(path: Path, value: str) -> None:
    with path.open("w") as fh:
        fh.write(value)


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _keyed(path: Path) -> dict[str, int]:
    """'key value' lines (memory.stat, memory.events, memory.oom_control) -> {key: value}."""
    out: dict[str, int] = {}
    try:
        for line in path.read_text().splitlines():
            k, _, v = line.partition(" ")
            if v.strip().lstrip("-").isdigit():
                out[k] = int(v)
    except OSError:
        pass
    return out


def _v2_root() -> Path | None:
    """A cgroup2 mount whose controllers include memory (None if there is none)."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    for line in mounts:
        parts = line.split()
        if len(parts) > 2 and parts[2] == "cgroup2":
            root = Path(parts[1])
            try:
                if "memory" in (root / "cgroup.controllers").read_text().split():
                    return root
            except OSError:
                continue
    return None


class Group:
    """A memory cgroup made for one run: `procs` (to join it), `peak`, `oom_kills`, `remove`."""

    kind = ""

    def __init__(self, path: Path, limit: int) -> None:
        self.path, self.limit = path, limit

    def procs(self) -> Path:
        """The file a process writes its pid to, to join the group."""
        return self.path / "cgroup.procs"

    def peak(self) -> tuple[int | None, str]:
        raise NotImplementedError

    def oom_kills(self) -> int | None:
        raise NotImplementedError

    def failcnt(self) -> int | None:
        return None

    def stat(self) -> dict[str, int]:
        return _keyed(self.path / "memory.stat")

    def poll(self) -> None:
        """Called every few ms while the command runs (v2 without memory.peak keeps its own maximum)."""

    def remove(self) -> None:
        """Remove the (empty) group; its charged page cache moves to the parent."""
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.02)  # the last task is still leaving


class V1Group(Group):
    kind = "cgroup-v1"

    @classmethod
    def make(cls, limit: int, parent: Path, name: str) -> V1Group:
        path = parent / name
        path.mkdir()
        g = cls(path, limit)
        try:
            _write(path / "memory.limit_in_bytes", str(limit))
            if (path / "memory.memsw.limit_in_bytes").exists():
                _write(path / "memory.memsw.limit_in_bytes", str(limit))  # swap must not stretch the limit
        except OSError:
            g.remove()
            raise
        return g

    def peak(self) -> tuple[int | None, str]:
        return _read_int(self.path / "memory.max_usage_in_bytes"), "memory.max_usage_in_bytes"

    def oom_kills(self) -> int | None:
        return _keyed(self.path / "memory.oom_control").get("oom_kill")

    def failcnt(self) -> int | None:
        return _read_int(self.path / "memory.failcnt")


class V2Group(Group):
    kind = "cgroup-v2"

    def __init__(self, path: Path, limit: int) -> None:
        super().__init__(path, limit)
        self._max_seen = 0

    @classmethod
    def make(cls, limit: int, parent: Path, name: str) -> V2Group:
        with contextlib.suppress(OSError):  # children of `parent` may use the memory controller
            _write(parent / "cgroup.subtree_control", "+memory")
        path = parent / name
        path.mkdir()
        g = cls(path, limit)
        try:
            _write(path / "memory.max", str(limit))
            if (path / "memory.swap.max").exists():
                _write(path / "memory.swap.max", "0")
        except OSError:
            g.remove()
            raise
        return g

    def poll(self) -> None:
        self._max_seen = max(self._max_seen, _read_int(self.path / "memory.current") or 0)

    def peak(self) -> tuple[int | None, str]:
        if (self.path / "memory.peak").exists():
            return _read_int(self.path / "memory.peak"), "memory.peak"
        return self._max_seen, "max of memory.current polled every 10 ms"

    def oom_kills(self) -> int | None:
        return _keyed(self.path / "memory.events").get("oom_kill")


def make_group(limit: int, controller: str | None, parent: Path | None, name: str) -> tuple[Group | None, list[str]]:
    """The first controller (or the one asked for) that can be written, and why the others could not."""
    tried: list[str] = []
    for kind in [controller] if controller else CONTROLLERS:
        if kind == "cgroup-v1":
            root = parent or V1_ROOT
            if not (root / "memory.limit_in_bytes").exists():
                tried.append(f"cgroup-v1: no v1 memory hierarchy at {root}")
                continue
            try:
                return V1Group.make(limit, root, name), tried
            except OSError as e:
                tried.append(f"cgroup-v1: {root}: {e.strerror or e}")
        elif kind == "cgroup-v2":
            root2 = parent or _v2_root()
            if root2 is None:
                tried.append("cgroup-v2: no cgroup2 mount offers the memory controller")
                continue
            try:
                return V2Group.make(limit, root2, name), tried
            except OSError as e:
                tried.append(f"cgroup-v2: {root2}: {e.strerror or e}")
        elif kind == "rlimit-as":
            return None, tried
        else:
            raise SystemExit(f"memlimit: unknown controller {kind!r} (one of {', '.join(CONTROLLERS)})")
    raise SystemExit("memlimit: no controller could be set up: " + "; ".join(tried))


# ---- the run --------------------------------------------------------------------------------------

def run_limited(cmd: Sequence[str], limit: int, *, drop: Iterable[str | Path] = (), drop_all: bool = False,
                controller: str | None = None, parent: Path | None = None, timeout: float | None = None,
                stdout: Any = None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `cmd` under a memory limit of `limit` bytes after dropping the page cache of `drop`; the
    measurement as a JSON-ready dict (see the module docstring). The command's own output goes to
    `stdout` (None: this process's stdout; stderr is always inherited)."""
    name = f"moeopt-memlimit-{os.getpid()}-{time.monotonic_ns()}"
    group, tried = make_group(limit, controller, parent, name)
    result: dict[str, Any] = {"command": list(cmd), "limit_bytes": limit,
                              "controller": group.kind if group else "rlimit-as",
                              "cgroup": str(group.path) if group else None, "not_used": tried}
    if group is None:
        result["substitute"] = ("RLIMIT_AS at the limit: caps the address space, not resident memory, and the "
                                "page cache is not counted (no writable memory cgroup here)")
    proc: subprocess.Popen[bytes] | None = None
    reaped = False
    try:
        result["dropped"] = drop_page_cache(drop, drop_all)

        # A small shell joins the group (or sets the rlimit) and execs the command. Not a preexec_fn: that
        # makes subprocess fork this process, and the child's peak RSS (kept across exec) would then
        # count this process's memory (a bench that imported torch: hundreds of MB) instead of vfork's 0.
        setup = f'echo $$ > "{group.procs()}"' if group is not None else f"ulimit -v {limit // 1024}"
        start = time.perf_counter()
        proc = subprocess.Popen(["/bin/sh", "-c", setup + ' && exec "$@"', "memlimit", *cmd], stdout=stdout,
                                env=env)
        done = threading.Event()
        hwm = [0]

        def poll() -> None:
            while not done.wait(0.01):
                hwm[0] = max(hwm[0], _vm_hwm(proc.pid))
                if group is not None:
                    group.poll()

        threading.Thread(target=poll, daemon=True).start()
        timed_out = False
        try:
            _, status, usage = os.wait4(proc.pid, 0) if timeout is None else _wait4_timeout(proc, timeout)
        except TimeoutError:
            proc.kill()
            _, status, usage = os.wait4(proc.pid, 0)
            timed_out = True
        reaped = True
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        done.set()
        code = proc.returncode
        sig = -code if code < 0 else None
        result.update({
            "wall_s": round(wall, 4), "returncode": code, "signal": signal.Signals(sig).name if sig else None,
            "timed_out": timed_out, "max_rss_bytes": hwm[0],
            # Linux keeps a process's peak RSS across exec, so this one counts the launcher's, i.e. this
            # process's, memory too (it forked the command): an upper bound only
            "ru_maxrss_bytes": usage.ru_maxrss * 1024,
            "user_s": round(usage.ru_utime, 3), "sys_s": round(usage.ru_stime, 3),
            "major_faults": usage.ru_majflt, "block_reads": usage.ru_inblock,  # 512-byte units
        })
        if group is not None:
            group.poll()
            peak, source = group.peak()
            stat = group.stat()
            kills = group.oom_kills()
            result.update({"peak_bytes": peak, "peak_source": source, "oom_kills": kills,
                           "failcnt": group.failcnt(),
                           "stat": {k: v for k, v in stat.items() if k in _STAT_KEYS}})
            result["oom_killed"] = bool(kills) or (sig == signal.SIGKILL and not timed_out and peak is not None
                                                   and peak >= limit * 0.98)
        else:
            result.update({"peak_bytes": hwm[0], "peak_source": "VmHWM of the command's process (no page cache)",
                           "oom_killed": False})
    finally:
        if proc is not None and not reaped:  # interrupted: the command must not outlive its group
            proc.kill()
            os.waitpid(proc.pid, 0)
        if group is not None:
            group.remove()
    return result


_STAT_KEYS = {"cache", "rss", "mapped_file", "total_cache", "total_rss", "total_mapped_file", "anon", "file",
              "file_mapped", "pgmajfault", "total_pgmajfault", "hierarchical_memory_limit"}


def _vm_hwm(pid: int) -> int:
    """The process's peak RSS so far (VmHWM, bytes) as /proc shows it; 0 once it is gone. Per address
    space: the command's own since its exec, unlike ``ru_maxrss``."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _wait4_timeout(proc: subprocess.Popen[Any], timeout: float) -> tuple[int, int, Any]:
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            return pid, status, usage
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.01)


def exit_status(result: dict[str, Any]) -> int:
    """The command's status as a shell gives it (128 + signal), 124 on timeout."""
    if result.get("timed_out"):
        return 124
    code = int(result["returncode"])
    return 128 - code if code < 0 else code


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", required=True, help="memory limit, e.g. 2GiB, 300MB")
    ap.add_argument("--drop", action="append", default=[], help="file or folder whose page cache to drop first "
                    "(repeatable)")
    ap.add_argument("--drop-all", action="store_true", help="also write /proc/sys/vm/drop_caches (every cache "
                    "of the machine)")
    ap.add_argument("--controller", choices=CONTROLLERS, help="default: the first of these that can be written")
    ap.add_argument("--parent", type=Path, help="make the group under this cgroup (default: the hierarchy's root)")
    ap.add_argument("--timeout", type=float, help="kill the command after this many seconds")
    ap.add_argument("--json", type=Path, help="write the result here (default: stdout, after the command's output)")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- the command and its arguments")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds run_limited: command killed, group removed
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("no command given (put it after --)")
    result = run_limited(cmd, parse_size(args.limit), drop=args.drop, drop_all=args.drop_all,
                         controller=args.controller, parent=args.parent, timeout=args.timeout)
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    else:
        print(text)
    if result.get("oom_killed"):
        print(f"memlimit: the command was OOM-killed at the {result['limit_bytes']} byte limit "
              f"(peak {result['peak_bytes']} bytes)", file=sys.stderr)
    return exit_status(result)


if __name__ == "__main__":
    sys.exit(main())
