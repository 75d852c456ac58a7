"""A dense Llama split into an all-experts-active Mixtral equals its source (issue 31, item 1).

The real SmolLM2 import downloads 93 MB; these tests split a tiny random Llama the same way, so CI
downloads nothing. Measured: max |logit diff| 6e-8 to 1.2e-7 in fp32 (E=4 and 8, tied or not).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MixtralForCausalLM

import moeopt
from moeopt.data.smollm2 import MARKER, load_gguf, write_split
from moeopt.errors import BadInputError, UnsupportedModelError
from moeopt.ir.split import split_llama

TOL = 1e-4


def _dense(tie: bool = True, ffn: int = 64, **kw: object) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=ffn, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie, rms_norm_eps=1e-5,
                      rope_parameters={"rope_type": "default", "rope_theta": 1e5}, **kw)
    return LlamaForCausalLM(cfg).eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("experts", [4, 8])
@pytest.mark.parametrize("tie", [True, False])
def test_split_equals_dense_and_reloads(tmp_path: Path, experts: int, tie: bool) -> None:
    torch.set_num_threads(1)
    dense = _dense(tie)
    moe = split_llama(dense, experts)
    assert isinstance(moe, MixtralForCausalLM)
    assert moe.config.num_local_experts == experts == moe.config.num_experts_per_tok
    assert moe.config.intermediate_size == 64 // experts
    ids = _ids()
    with torch.no_grad():
        ref = dense(ids).logits
        assert (moe(ids).logits - ref).abs().max().item() < TOL
    moe.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert isinstance(back, MixtralForCausalLM)
    ir = moeopt.load(tmp_path)
    assert len(ir.layers) == 2
    with torch.no_grad():
        assert (back(ids).logits - ref).abs().max().item() < TOL
        assert (ir.hf(ids).logits - ref).abs().max().item() < TOL


def test_dropping_an_expert_changes_the_output() -> None:
    """The equality is not vacuous: the experts carry the FFN (a zeroed expert moves the logits)."""
    dense = _dense()
    moe = split_llama(dense, 4)
    ids = _ids()
    with torch.no_grad():
        ref = dense(ids).logits
        moe.model.layers[0].mlp.experts.down_proj[1].zero_()
        assert (moe(ids).logits - ref).abs().max().item() > 1e-3


def test_ffn_not_divisible_is_one_line_error() -> None:
    with pytest.raises(BadInputError, match="cannot split an FFN of 64 neurons into 3"):
        split_llama(_dense(), 3)


def test_bias_is_refused() -> None:
    with pytest.raises(UnsupportedModelError, match="attention_bias"):
        split_llama(_dense(attention_bias=True), 4)


def test_corrupt_gguf_writes_nothing(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    out = tmp_path / "out"
    with pytest.raises(BadInputError, match=r"bad\.gguf"):
        write_split(bad, out, experts=8)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.gguf"]


def test_missing_gguf_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="no such GGUF file"):
        load_gguf(tmp_path / "absent.gguf")


def test_cli_missing_gguf_exit_2_nothing_written(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "moeopt.cli", "import", "smollm2", "-o", str(out),
                           "--gguf", str(tmp_path / "absent.gguf")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no such GGUF file" in proc.stderr
    assert not out.exists()


def test_marker_lets_overwrite_replace_an_import(tmp_path: Path) -> None:
    """The import's folder carries moeopt's marker, so --overwrite may replace it (and only it)."""
    from moeopt.outdir import check_out_dir

    out = tmp_path / "o"
    out.mkdir()
    (out / MARKER).write_text(json.dumps({"format": "moeopt-import"}))
    check_out_dir(out, overwrite=True)
    with pytest.raises(BadInputError, match="not empty"):
        check_out_dir(out, overwrite=False)


def test_cli_bad_expert_count_refused_before_download(tmp_path: Path) -> None:
    """--experts that does not divide SmolLM2's FFN fails in one line with no download (cache stays empty)."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-m", "moeopt.cli", "import", "smollm2", "-o", str(out),
                           "--experts", "7", "--cache", str(cache)], capture_output=True, text=True)
    assert proc.returncode == 2 and "into 7 equal experts" in proc.stderr
    assert not out.exists() and not cache.exists()
