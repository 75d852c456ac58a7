"""Distributed compilation on torch.distributed: shard the calibration batch and the per-expert work.

`torchrun --nproc-per-node P -m moeopt convert ...` starts P copies of the command; torchrun's environment
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) makes `session()` join them into one process group (gloo on
CPU; with CUDA, gloo for CPU tensors and nccl for CUDA ones). Every rank loads the model and runs the same
pipeline, so every rank takes the same decisions; the helpers below are where ranks split work and meet:

- `shard(batches)`: this rank's contiguous share of the calibration batches (rank 0 the first ones);
- `all_reduce_(tensors)`: statistics summed over ranks in float64 (counts stay exact; float sums differ
  from one process only by summation order);
- `map_items(items, fn)`: per-expert work dealt round-robin over ranks, results all-gathered in item order
  (each item is computed by exactly the code one process runs, so the results are bit-identical);
- `on_main(fn)`: rank 0 alone runs `fn` (writing the checkpoint or the artifact), the others wait;
- `local(fn)`: work every rank does on its own share (forward passes).

Every helper is collective: each rank calls it at the same point of the pipeline. An exception in any
rank's share is gathered, and every rank raises the same error (the lowest failing rank's), so the CLI
ends every rank with one line and exit code 2. A rank that dies ends its peers' next collective with a
`DistributedError`. Outside a process group (`world() == 1`) every helper is the plain single-process code
path, and costs nothing.

No RPC and no process pool of our own: torchrun starts the processes, gloo/nccl move the bytes.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from moeopt.errors import DistributedError, MoeOptError, PassError
from moeopt.ranks import ENV as ENV
from moeopt.ranks import launched as launched
from moeopt.ranks import launched_world as launched_world

T = TypeVar("T")
R = TypeVar("R")
TIMEOUT_ENV = "MOEOPT_DIST_TIMEOUT"  # seconds a rank waits in one collective (rank 0 may lower for long)
DEFAULT_TIMEOUT_S = 3 * 3600


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def active() -> bool:
    """Whether a process group is initialised (by `session` or by the caller)."""
    dist = _dist()
    return bool(dist.is_available() and dist.is_initialized())


def world() -> int:
    """Number of ranks (1 outside a process group)."""
    return int(_dist().get_world_size()) if active() else 1


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return int(_dist().get_rank()) if active() else 0


def is_main() -> bool:
    """Whether this rank writes outputs (rank 0)."""
    return rank() == 0


def backend() -> str:
    """gloo for CPU tensors; with CUDA (and nccl built in) CUDA tensors go through nccl."""
    dist = _dist()
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


@contextlib.contextmanager
def session() -> Iterator[bool]:
    """Join torchrun's process group for the duration of a command; yields whether it is distributed.

    A no-op when the environment has no torchrun variables or a group already exists (the caller's).
    Non-main ranks silence tqdm: one progress bar per job, on rank 0.
    """
    if not launched() or active():
        yield active()
        return
    dist = _dist()
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed; run without torchrun")
    timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    try:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        dist.init_process_group(backend(), timeout=datetime.timedelta(seconds=timeout))
    except (RuntimeError, ValueError) as e:
        raise DistributedError(f"could not join the process group ({type(e).__name__}: {e})") from e
    if not is_main():
        os.environ["TQDM_DISABLE"] = "1"
    try:
        yield True
    finally:
        dist.destroy_process_group()


def launch_local(nproc: int, argv: Sequence[str]) -> int:
    """Run `python -m moeopt ARGV` as `nproc` ranks on this machine; returns the exit status for the caller.

    torch.distributed's elastic launcher does what `torchrun --standalone --nproc-per-node N` does (a
    local c10d rendezvous on a free port, no restarts); the ranks see torchrun's environment, so the
    same command line runs distributed in them. Each rank prints its own one-line error; the launcher's
    logging and its ChildFailedError report are replaced by the status: 2 when a rank failed on purpose
    (or was killed), otherwise the failing rank's own.
    """
    import logging
    import sys
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    import moeopt

    here = str(Path(moeopt.__file__).resolve().parents[1])  # the ranks import this moeopt, not another install
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
    if "OMP_NUM_THREADS" not in os.environ:  # as torchrun does, but sharing the cores instead of 1 each
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"moeopt-{uuid.uuid4().hex}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
    quiet = logging.getLogger("torch.distributed.elastic")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        elastic_launch(config, sys.executable)("-m", "moeopt", *argv)
    except ChildFailedError as e:
        codes = {r: f.exitcode for r, f in e.failures.items()}
        if 2 in codes.values():
            return 2
        r, code = min(codes.items())
        if code < 0:
            print(f"moeopt: error: rank {r} was killed by signal {-code}", file=sys.stderr)
            return 2
        return code
    finally:
        quiet.setLevel(level)
    return 0


def shard(items: Sequence[T]) -> list[T]:
    """This rank's contiguous share of `items` (rank r: items[n*r//P : n*(r+1)//P]).

    Contiguous, so that concatenating the ranks' results in rank order gives the single-process order.
    """
    n, p, r = len(items), world(), rank()
    return list(items[n * r // p : n * (r + 1) // p])


def all_reduce_(tensors: Sequence[torch.Tensor]) -> None:
    """Sum every tensor over the ranks, in place, in float64 (one collective for all of them).

    Integer-valued statistics (routing counts, row counts below 2**53) stay exact; float sums differ from
    one process's only by summation order. The result is the same on every rank, so every rank takes the
    same decisions from it. Streaming code can call it on its per-layer statistics too.
    """
    if world() == 1 or not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
    _collective(lambda: _dist().all_reduce(flat))
    off = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            t.copy_(flat[off : off + n].view_as(t).to(t.dtype))
            off += n


def all_gather(obj: T) -> list[T]:
    """Every rank's `obj` (picklable), in rank order."""
    if world() == 1:
        return [obj]
    out: list[Any] = [None] * world()
    _collective(lambda: _dist().all_gather_object(out, obj))
    return out


def local(fn: Callable[[], R]) -> R:
    """Run `fn` on every rank (e.g. forward passes over its shard); if any rank fails, all raise its error."""
    if world() == 1:
        return fn()
    result: Any = None
    err: BaseException | None = None
    try:
        result = fn()
    except Exception as e:  # every rank must hear of it before anyone raises
        err = e
    _raise_first(all_gather(_describe(err)), err)
    return result  # type: ignore[no-any-return]


def map_items(items: Sequence[T], fn: Callable[[T], R]) -> list[R]:
    """`[fn(x) for x in items]`, with item i computed on rank i % P and the results all-gathered.

    Round-robin so that neighbouring (similar-sized) items land on different ranks; the same items in the
    same order always go to the same ranks, so a later map over them finds what `fn` cached there.
    """
    if world() == 1:
        return [fn(x) for x in items]
    mine: dict[int, R] = {}
    err: BaseException | None = None
    try:
        for i in range(rank(), len(items), world()):
            mine[i] = fn(items[i])
    except Exception as e:
        err = e
    gathered = all_gather((None if err is not None else mine, _describe(err)))
    _raise_first([d for _, d in gathered], err)
    out: list[Any] = [None] * len(items)
    for part, _ in gathered:
        for i, v in (part or {}).items():
            out[i] = v
    return out


def on_main(fn: Callable[[], R]) -> R | None:
    """Rank 0 alone runs `fn` (writes files); the others wait for it and get its (picklable) result.

    If it fails, every rank raises its error, so no rank goes on as if the output had been written.
    """
    if world() == 1:
        return fn()
    result: Any = None
    err: BaseException | None = None
    if is_main():
        try:
            result = fn()
        except Exception as e:
            err = e
    box = [(result, _describe(err))]
    _collective(lambda: _dist().broadcast_object_list(box, src=0))
    result, described = box[0]
    _raise_first([described], err if is_main() else None)
    return result  # type: ignore[no-any-return]


def _collective(op: Callable[[], object]) -> None:
    """Run a collective; a peer that died or timed out becomes a one-line DistributedError."""
    try:
        op()
    except RuntimeError as e:  # DistBackendError and gloo's connection errors are RuntimeErrors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedError(f"rank {rank()}: lost contact with the other ranks ({first})") from e


Described = tuple[int, str, str, str] | None  # (rank, module, class name, message)


def _describe(err: BaseException | None) -> Described:
    if err is None:
        return None
    return rank(), type(err).__module__, type(err).__qualname__, str(err)


def _raise_first(described: Sequence[Described], mine: BaseException | None) -> None:
    """Raise, on every rank, the same error: the lowest failing rank's (rebuilt from its class and text)."""
    failed = [d for d in described if d is not None]
    if not failed:
        return
    err = _rebuild(*failed[0][1:])
    if mine is not None and failed[0][0] == rank():
        raise err from mine  # --debug shows the original traceback on the rank where it happened
    raise err


def _rebuild(module: str, name: str, message: str) -> BaseException:
    """An exception of the same class and message where that is possible, else a RuntimeError naming it."""
    import importlib

    try:
        cls = getattr(importlib.import_module(module), name.rpartition(".")[2], None)
    except ImportError:
        cls = None
    if isinstance(cls, type) and issubclass(cls, MoeOptError):
        e: BaseException = cls.__new__(cls)
        Exception.__init__(e, message)  # not cls(...): PassError's constructor takes the pass name apart
        if issubclass(cls, PassError):
            e.pass_name = message.split("'")[1] if message.count("'") >= 2 else ""  # type: ignore[attr-defined]
        return e
    if isinstance(cls, type) and issubclass(cls, Exception):
        with contextlib.suppress(Exception):
            return cls(message)
    return RuntimeError(f"{name}: {message}")
