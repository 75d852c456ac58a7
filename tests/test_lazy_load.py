"""Checkpoints read by their headers: `inspect` reads no weight, bad shards are one line and exit code 2,
and a checkpoint in bfloat16 loads to the same IR as before."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import moeopt
from moeopt.ir.load import load_skeleton
from moeopt.ir.safetensors_check import INDEX_FILE, checkpoint_tensors
from tests.test_cli import one_line_exit_2, run_cli


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Mixtral in bfloat16, in several shards with a model.safetensors.index.json."""
    from moeopt.testing import tiny_model

    path = tmp_path_factory.mktemp("sharded") / "tiny-mixtral"
    tiny_model("mixtral").to(torch.bfloat16).save_pretrained(path, max_shard_size="40KB")
    assert (path / INDEX_FILE).exists() and len(list(path.glob("*.safetensors"))) >= 3
    return path


def _poison_experts(folder: Path) -> int:
    """Overwrite every routed expert tensor's bytes with 0xFF (NaN in bfloat16); returns how many."""
    n = 0
    for key, info in checkpoint_tensors(folder).items():
        if ".experts." in key:
            with open(info.shard, "r+b") as f:
                f.seek(info.begin)
                f.write(b"\xff" * info.nbytes)
            n += 1
    return n


def test_inspect_reads_no_expert_weight(sharded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """inspect's output does not depend on the expert weights' values: NaN experts, which a full load
    refuses (its per-layer check cannot reproduce a NaN block), inspect exactly as the intact checkpoint."""
    code, intact, _ = run_cli("inspect", str(sharded), "--json", capsys=capsys)
    assert code == 0
    disk = json.loads(intact)["checkpoint"]  # the bytes on disk, from the headers: bf16 here
    assert disk["files"] == len(list(sharded.glob("*.safetensors"))) and list(disk["bytes_by_dtype"]) == ["BF16"]
    assert disk["bytes"] == 2 * disk["numel"] == sum(f.stat().st_size for f in sharded.glob("*.safetensors")) - sum(
        8 + int.from_bytes(f.read_bytes()[:8], "little") for f in sharded.glob("*.safetensors"))
    bad = tmp_path / "poisoned"
    shutil.copytree(sharded, bad)
    assert _poison_experts(bad) > 0
    code, out, err = run_cli("inspect", str(bad), "--json", capsys=capsys)
    assert code == 0, err
    assert json.loads(out) == json.loads(intact)
    with pytest.raises(moeopt.UnsupportedModelError, match="does not reproduce the block"):
        moeopt.load(bad)
    m = load_skeleton(bad)
    assert all(p.is_meta for layer in m.layers for p in (layer.table.w_in, layer.table.w_out))


def test_inspect_equals_full_load(sharded: Path) -> None:
    """Counts, bytes, router semantics and layer metadata of the skeleton are those of a full load."""
    full, skel = moeopt.load(sharded), load_skeleton(sharded)
    assert skel.summary() == full.summary()
    assert skel.stats() == full.stats()
    assert [la.meta() for la in skel.layers] == [la.meta() for la in full.layers]


def test_inspect_of_a_compressed_moeopt_checkpoint(sharded: Path, tmp_path: Path) -> None:
    """A moeopt checkpoint (pruned, 4-bit experts): the skeleton keeps the packed sizes and the masks."""
    from moeopt.passes import PassManager

    pipeline = "prune{keep=0.5,method=magnitude},quantize{method=uniform,bits=4,group=16}"
    m = PassManager(pipeline).run(moeopt.load(sharded)).model
    m.save(tmp_path / "q")
    full, skel = moeopt.load(tmp_path / "q"), load_skeleton(tmp_path / "q")
    assert skel.stats() == full.stats()
    assert skel.summary() == full.summary()
    assert skel.layers[0].table.w_in.is_meta


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_missing_shard(sharded: Path, tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "missing"
    shutil.copytree(sharded, bad)
    gone = sorted(bad.glob("*.safetensors"))[1]
    gone.unlink()
    extra = ["-o", str(tmp_path / "out")] if command == "convert" else []
    code, _, err = run_cli(command, str(bad), *extra, capsys=capsys)
    one_line_exit_2(code, err, f"shard {gone.name} named in {INDEX_FILE} is missing")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_truncated_shard(sharded: Path, tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "truncated"
    shutil.copytree(sharded, bad)
    shard = sorted(bad.glob("*.safetensors"))[1]
    os.truncate(shard, shard.stat().st_size - 100)
    extra = ["-o", str(tmp_path / "out")] if command == "convert" else []
    code, _, err = run_cli(command, str(bad), *extra, capsys=capsys)
    one_line_exit_2(code, err, "truncated safetensors file", shard.name)
    assert not (tmp_path / "out").exists()


def test_corrupt_index_and_missing_tensor(sharded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "index"
    shutil.copytree(sharded, bad)
    index = json.loads((bad / INDEX_FILE).read_text())
    key, shard = next(iter(index["weight_map"].items()))
    index["weight_map"][key + ".extra"] = shard
    (bad / INDEX_FILE).write_text(json.dumps(index))
    code, _, err = run_cli("inspect", str(bad), capsys=capsys)
    one_line_exit_2(code, err, f"lacks tensor '{key}.extra'", shard)
    (bad / INDEX_FILE).write_text("{not json")
    code, _, err = run_cli("inspect", str(bad), capsys=capsys)
    one_line_exit_2(code, err, "corrupt shard index")


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16])
def test_16bit_checkpoint_loads_as_before(tmp_path: Path, stored: torch.dtype) -> None:
    """A 16-bit checkpoint read in its own dtype and upcast tensor by tensor gives the IR, weights and
    logits of transformers' float32 read, bit for bit."""
    from transformers import AutoModelForCausalLM

    from moeopt.testing import tiny_model

    path = tmp_path / "ck"
    tiny_model("qwen2_moe").to(stored).save_pretrained(path, max_shard_size="60KB")
    ref = moeopt.load(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), inplace=True)
    got = moeopt.load(path)
    assert got.dtype == torch.float32 and got.storage_dtype == str(stored).removeprefix("torch.")
    want_state, got_state = ref.hf.state_dict(), got.hf.state_dict()
    assert want_state.keys() == got_state.keys()
    for key, t in want_state.items():
        assert got_state[key].dtype == t.dtype and torch.equal(got_state[key], t), key
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(got.logits(ids), ref.logits(ids))


def test_upcast_refuses_a_buffer_computed_in_16_bits() -> None:
    """A non-persistent buffer built at load in the 16-bit dtype would differ from one built in float32:
    such a model is not upcast (the loader reads it again in float32)."""
    from torch import nn

    from moeopt.ir.load import cast_each

    m = nn.Linear(4, 4).to(torch.bfloat16)
    m.register_buffer("freq", torch.ones(2, dtype=torch.bfloat16), persistent=False)
    assert not cast_each(m, torch.float32)
    assert m.weight.dtype == torch.bfloat16
    m.freq = torch.ones(2)
    assert cast_each(m, torch.float32) and m.weight.dtype == torch.float32


def test_save_writes_shards_and_reads_them_back(sharded: Path, tmp_path: Path) -> None:
    """A moeopt checkpoint above the shard size is written shard by shard with an index; it loads back
    bit-identical, and its skeleton has the full load's counts."""
    from moeopt.ir.checkpoint import save_checkpoint

    m = moeopt.load(sharded)
    save_checkpoint(m, tmp_path / "s", shard_bytes=20_000)
    shards = sorted((tmp_path / "s").glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and (tmp_path / "s" / INDEX_FILE).exists()
    assert not (tmp_path / "s" / "model.safetensors").exists()
    back = moeopt.load(tmp_path / "s")
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    assert torch.equal(back.logits(ids), m.logits(ids))
    assert load_skeleton(tmp_path / "s").stats() == back.stats()


def test_checkpoint_missing_a_tensor_is_refused_by_inspect(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without an index to name it, a tensor left out of the shards is found by counting values."""
    from safetensors.torch import load_file, save_file

    from moeopt.testing import tiny_model

    path = tmp_path / "ck"
    tiny_model("mixtral").save_pretrained(path)
    state = load_file(str(path / "model.safetensors"))
    state.pop("model.layers.1.self_attn.q_proj.weight")
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    code, _, err = run_cli("inspect", str(path), capsys=capsys)
    one_line_exit_2(code, err, "tensors missing from the checkpoint")


@pytest.mark.parametrize("model_type", ["granitemoe", "qwen2_moe", "deepseek_v3", "minimax_m3_vl_text"])
def test_skeleton_equals_full_load_across_architectures(model_type: str, tmp_path: Path) -> None:
    """Router semantics probed on a random copy (granitemoe: no named adapter), shared experts, score
    biases, and a shared expert recognised by what it computes (MiniMax-M3's fused clamped SwiGLU)."""
    from moeopt.archs import tiny_model

    tiny_model(model_type, layers=2).save_pretrained(tmp_path / "ck")
    full, skel = moeopt.load(tmp_path / "ck"), load_skeleton(tmp_path / "ck")
    assert skel.summary() == full.summary() and skel.stats() == full.stats()
    assert [la.meta() for la in skel.layers] == [la.meta() for la in full.layers]
    assert skel.adapters == full.adapters
    assert all(p.is_meta for la in skel.layers for p in la.parameters())
