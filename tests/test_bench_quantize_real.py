"""bench/quantize_real.py: moeopt's side scores exactly llama-perplexity's positions; unknown options skip rows."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import llama_tools  # bench/ is a folder of scripts, not a package
import quantize_real


class _TinyLM(torch.nn.Module):
    """A causal LM whose logit at t depends on every id up to t (a cumulative mean of embeddings)."""

    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(vocab, dim, generator=g))
        self.out = torch.nn.Parameter(torch.randn(dim, vocab, generator=g))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.emb[input_ids]  # (B, T, D)
        steps = torch.arange(1, x.shape[1] + 1, dtype=x.dtype).view(1, -1, 1)
        return (x.cumsum(1) / steps) @ self.out  # (B, T, V)


def _llama_perplexity_loop(model: _TinyLM, tokens: list[int], n_ctx: int, bos: int | None) -> float:
    """tools/perplexity/perplexity.cpp's perplexity(), transcribed: chunks of n_ctx, BOS first, second half."""
    first, nll, count = n_ctx // 2, 0.0, 0
    for i in range(len(tokens) // n_ctx):
        chunk = tokens[i * n_ctx : (i + 1) * n_ctx]
        if bos is not None:
            chunk = [bos, *chunk[1:]]
        logp = torch.log_softmax(model(torch.tensor([chunk]))[0], -1)
        for j in range(first, n_ctx - 1):  # logits at j predict chunk[j + 1]
            nll -= float(logp[j, chunk[j + 1]])
            count += 1
    return math.exp(nll / count)


@pytest.mark.parametrize("bos", [None, 1])
def test_scored_positions_equal_llama_perplexity(bos: int | None) -> None:
    model = _TinyLM()
    ids = torch.randint(0, 11, (50,), generator=torch.Generator().manual_seed(1)).tolist()  # 3 windows + a tail
    with torch.no_grad():
        got = quantize_real.score(model, quantize_real.model_stream(ids, 16, bos), 16)
        want = _llama_perplexity_loop(model, ids, 16, bos)
    assert got["windows"] == 3 and got["scored_tokens"] == 3 * 7
    assert got["ppl"] == pytest.approx(want, rel=1e-9)


def test_rows_needing_an_option_the_pass_lacks_are_skipped() -> None:
    rows = {r.label: r for r in quantize_real.moeopt_rows()}
    assert quantize_real.missing_options(rows["rtn-u4"]) is None
    fake = quantize_real.MoeoptRow("x", algo="no-such-algo", bits=4)
    from moeopt.passes.registry import get_pass

    names = {o.name for o in get_pass("quantize").options}
    why = quantize_real.missing_options(fake)
    assert why is not None and ("algo" in why)
    if "non-experts" not in names:
        assert "non-experts" in (quantize_real.missing_options(rows["rtn-u4+ne"]) or "")


def test_find_tool_reports_why_a_tool_is_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llama_tools, "BIN_ROOT", tmp_path / "none")
    monkeypatch.setenv("MOEOPT_LLAMA_BIN", str(tmp_path))
    assert llama_tools.find_tool("llama-perplexity") is None
    assert "build it with" in (llama_tools.why_absent("llama-perplexity") or "")
    tool = tmp_path / "llama-perplexity"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    assert llama_tools.find_tool("llama-perplexity") == tool and llama_tools.why_absent("llama-perplexity") is None
