"""Distributed compilation (moeopt.distributed): 2 ranks on gloo give one process's checkpoint, bit for bit.

The torchrun test runs a pipeline that uses every sharded path (importance and GPTQ Hessians over the
ranks' calibration shards, the quantize sensitivity's inputs gathered, per-expert loss sensitivity, merge
alignment, GPTQ sensitivity and packing by expert) and compares the files' sha256 with an in-process run.
The helper test spawns 2 gloo ranks and checks the error agreement: a failure on one rank is the same
one-line error on every rank.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeopt import distributed
from tests.test_cli import run_cli

REPO = Path(__file__).resolve().parents[1]


def tiny_moe(folder: Path) -> tuple[Path, Path]:
    """A tiny Mixtral (8 experts, distinct router preferences) and 1024 tokens of calibration ids."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=128)
    model = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 1.0)
    ckpt = folder / "ckpt"
    model.save_pretrained(ckpt)
    gen = torch.Generator().manual_seed(1)
    calib = folder / "calib.jsonl"
    calib.write_text("".join(json.dumps({"ids": torch.randint(0, 97, (64,), generator=gen).tolist()}) + "\n"
                             for _ in range(16)))
    return ckpt, calib


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file, raw bytes (moeopt's safetensors headers are the same from process to process:
    see `moeopt.ir.checkpoint.ST_METADATA`)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_torchrun_two_ranks_write_one_process_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt, calib = tiny_moe(tmp_path)
    c = f"calib={calib},seq-len=32"
    pipeline = (f"importance{{{c},progress=false}},sensitivity{{{c},max-tokens=256,progress=false}},"
                "prune{keep=0.5,cold=0.25,score=loss},match,merge,"
                f"quantize{{avg-bits=4,candidates=2;4;8,algo=gptq,{c},calib-tokens=1024,group=16}}")
    one = tmp_path / "one"
    code, _, err = run_cli("convert", str(ckpt), "-o", str(one), "--passes", pipeline, capsys=capsys)
    assert code == 0, err
    two = tmp_path / "two"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}  # one thread, as this process runs
    for k in distributed.ENV:  # a test run under torchrun must not leak its own group into the child
        env.pop(k, None)
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "moeopt", "convert", str(ckpt), "-o", str(two), "--passes", pipeline],
        capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("wrote ") == 1 and "on 2 ranks" in run.stdout  # rank 0 alone writes and prints
    assert digests(two) == digests(one)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.jsonl", "ckpt", "one", "two"]  # no stray files


def _worker(rank: int, folder: str) -> None:
    """One of 2 gloo ranks: exercise the helpers, record what each saw in rank{N}.json."""
    import torch.distributed as dist

    from moeopt.errors import BadInputError, MoeOptError

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    seen: dict[str, object] = {"world": distributed.world(), "shard": distributed.shard(list(range(5)))}
    counts = torch.tensor([float(rank + 1), 2.0**52 + rank], dtype=torch.float64)
    distributed.all_reduce_([counts])
    seen["reduced"] = counts.tolist()
    seen["map"] = distributed.map_items(list(range(5)), lambda i: (i * i, distributed.rank()))

    def fail_on_rank_1(i: int) -> int:
        if distributed.rank() == 1:
            raise BadInputError(f"item {i} is bad")
        return i

    def fail_on_main() -> None:
        raise ValueError("disk full")

    for name, call in (("map_error", lambda: distributed.map_items([0, 1, 2], fail_on_rank_1)),
                       ("main_error", lambda: distributed.on_main(fail_on_main)),
                       ("local_error", lambda: distributed.local(lambda: 1 // (rank - 1)))):
        try:
            call()
            seen[name] = None
        except (MoeOptError, ValueError, ZeroDivisionError) as e:
            seen[name] = [type(e).__name__, str(e)]
    seen["after"] = distributed.all_gather(rank)  # the ranks are still in step after the errors
    Path(folder, f"rank{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()


def test_helpers_two_gloo_ranks_agree_on_results_and_errors(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(str(tmp_path),), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["world"] == r1["world"] == 2
    assert r0["shard"] + r1["shard"] == [0, 1, 2, 3, 4]  # contiguous, rank 0 first
    assert r0["reduced"] == r1["reduced"] == [3.0, 2.0**53 + 1]  # float64: integer counts stay exact
    assert r0["map"] == r1["map"] == [[0, 0], [1, 1], [4, 0], [9, 1], [16, 0]]  # item i on rank i % 2
    assert r0["map_error"] == r1["map_error"] == ["BadInputError", "item 1 is bad"]
    assert r0["main_error"] == r1["main_error"] == ["ValueError", "disk full"]
    assert r0["local_error"] == r1["local_error"] == ["ZeroDivisionError", "integer division or modulo by zero"]
    assert r0["after"] == r1["after"] == [0, 1]


def test_single_process_helpers_are_the_plain_code() -> None:
    assert not distributed.active() and distributed.world() == 1 and distributed.is_main()
    assert distributed.shard([1, 2, 3]) == [1, 2, 3]
    assert distributed.map_items([1, 2], lambda x: x + 1) == [2, 3]
    assert distributed.on_main(lambda: 7) == 7
    t = torch.ones(2)
    distributed.all_reduce_([t])
    assert t.tolist() == [1.0, 1.0]


def test_nproc_error_is_one_line_per_rank_and_exit_2(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    for k in distributed.ENV:
        env.pop(k, None)
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "moeopt", "convert", str(tmp_path / "no-model"), "-o", str(out), "--passes",
         "importance,nosuchpass", "--nproc", "2"],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )
    assert run.returncode == 2, run.stderr[-3000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 2 and all(x.startswith("moeopt: error: ") and "nosuchpass" in x for x in lines), lines
    assert run.stdout == "" and list(tmp_path.iterdir()) == []  # the launcher's report is not shown; nothing written
