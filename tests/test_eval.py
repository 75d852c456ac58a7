"""Tests of moeopt.eval on a tiny random Mixtral and a tokenizer trained on the data fixtures."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from transformers import MixtralConfig, MixtralForCausalLM

from moeopt.data import ALL_APPS, APPS, App, app_split
from moeopt.eval import app_accuracy, evaluate, format_table, label_scores, macro_f1, perplexity
from moeopt.eval.classify import gold_label_scores, label_continuations, plan_jobs
from moeopt.eval.model_io import encode, eos_id
from moeopt.eval.perplexity import token_stream, windows
from tests.conftest import FIXTURE_DATA as FIXTURES
from tests.conftest import fixture_tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return fixture_tokenizer(400)


@pytest.fixture(scope="module")
def model(tok: Tokenizer) -> MixtralForCausalLM:
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=512)
    m = MixtralForCausalLM(cfg).eval()
    # Random init logits are nearly flat; sharpen them so scores differ well beyond tolerances.
    with torch.no_grad():
        m.lm_head.weight.mul_(20.0)
    return m


def _direct_nll(model: torch.nn.Module, ids: list[int]) -> tuple[float, int]:
    """Summed NLL of ids[1:] given the prefix, one unbatched forward without a mask."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()  # (T, V)
    logp = torch.log_softmax(logits, dim=-1)
    return -sum(logp[i, ids[i + 1]].item() for i in range(len(ids) - 1)), len(ids) - 1


def test_windows_score_every_token_once() -> None:
    for n in range(2, 40):
        for context in (1, 3, 8):
            for stride in range(1, context + 1):
                scored: list[int] = []
                for begin, length, k in windows(n, context, stride):
                    assert 1 <= k <= length <= context
                    scored += range(begin + length - k + 1, begin + length + 1)
                assert scored == list(range(1, n)), (n, context, stride)
    with pytest.raises(ValueError):
        windows(10, 4, 5)


def test_perplexity_is_exp_of_hand_computed_mean_nll(model: torch.nn.Module, tok: Tokenizer) -> None:
    texts = ["The minister said the vote was close.", "Markets fell on Tuesday."]
    stream = token_stream(tok, texts)
    assert stream[len(encode(tok, texts[0]))] == eos_id(tok)  # documents separated by EOS
    nll, n = _direct_nll(model, stream)
    res = perplexity(model, tok, texts, context=256, progress=False)
    assert res["tokens"] == n == len(stream) - 1
    assert res["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    # Small windows: the sum of independent per-window NLLs, whatever the batch size.
    hand, count = 0.0, 0
    for begin, length, k in windows(len(stream), 5, 5):
        part, m = _direct_nll(model, stream[begin : begin + length + 1])
        assert m == k == length
        hand, count = hand + part, count + m
    for bs in (1, 3):
        res = perplexity(model, tok, texts, context=5, batch_size=bs, progress=False)
        assert res["nll"] == pytest.approx(hand / count, rel=1e-5)
    capped = perplexity(model, tok, texts, context=5, max_tokens=7, progress=False)
    assert capped["tokens"] == 7


def _direct_label_scores(model: torch.nn.Module, tok: Tokenizer, app: App, text: str) -> list[float]:
    """Each label scored alone: one unbatched forward of EOS + prompt + label, no sharing."""
    prompt_ids, conts = label_continuations(tok, app.prompt(text), app.labels)
    prefix = [eos_id(tok), *prompt_ids]
    out = []
    for cont in conts:
        ids = prefix + cont
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        out.append(sum(logp[len(prefix) - 1 + j, t].item() for j, t in enumerate(cont)))
    return out


@pytest.mark.parametrize("app_name", ["tweet-sentiment", "news-topic"])
def test_label_scores_match_direct_and_ignore_batching(model: torch.nn.Module, tok: Tokenizer,
                                                        app_name: str) -> None:
    app = APPS[app_name]
    texts = [r["text"] for r in app_split(FIXTURES, app_name, "test")[:6]]
    direct = np.array([_direct_label_scores(model, tok, app, t) for t in texts])  # (N, L)
    one = label_scores(model, tok, app, texts, batch_size=1, progress=False)
    four = label_scores(model, tok, app, texts, batch_size=4, progress=False)
    np.testing.assert_allclose(one, direct, rtol=0, atol=1e-4)
    np.testing.assert_allclose(four, one, rtol=0, atol=1e-5)
    assert np.ptp(direct, axis=1).min() > 1e-3  # labels really are told apart


@pytest.mark.parametrize("app_name", ["health-source", "intent"])
def test_gold_label_scores_equal_the_gold_column(model: torch.nn.Module, tok: Tokenizer, app_name: str) -> None:
    # health-source has multi-token labels: scoring only the gold one needs fewer forwards, same values.
    app = ALL_APPS[app_name]
    rows = app_split(FIXTURES, app_name, "test")[:8]
    texts, gold = [r["text"] for r in rows], [app.labels.index(r["label"]) for r in rows]
    full = label_scores(model, tok, app, texts, batch_size=4, progress=False)  # (N, L)
    only = gold_label_scores(model, tok, app, texts, gold, batch_size=4)  # (N,)
    np.testing.assert_allclose(only, full[np.arange(len(rows)), gold], rtol=0, atol=1e-5)
    assert len(set(gold)) > 1 and (only < 0).all()


def test_app_accuracy_predicts_argmax_label(model: torch.nn.Module, tok: Tokenizer) -> None:
    app = APPS["intent"]
    rows = app_split(FIXTURES, "intent", "test")[:10]
    res = app_accuracy(model, tok, app, rows, batch_size=4, return_predictions=True, progress=False)
    direct = [_direct_label_scores(model, tok, app, r["text"]) for r in rows]
    assert res["predictions"] == [app.labels[int(np.argmax(s))] for s in direct]
    gold = [r["label"] for r in rows]
    assert res["accuracy"] == pytest.approx(np.mean([p == g for p, g in zip(res["predictions"], gold,
                                                                            strict=True)]))
    assert res["n"] == 10 and 0 < res["majority_acc"] <= 1


class _Rigged(torch.nn.Module):
    """Wraps a model and adds a large bias to some tokens' logits: the label made of them must win."""

    def __init__(self, inner: torch.nn.Module, tokens: list[int]) -> None:
        super().__init__()
        self.inner, self.tokens = inner, tokens
        self.config = inner.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits = self.inner(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
        logits[..., self.tokens] += 1e3
        return logits


def test_rigged_model_always_predicts_the_favoured_label(model: torch.nn.Module, tok: Tokenizer) -> None:
    app = APPS["movie-sentiment"]
    rows = app_split(FIXTURES, app.name, "test")
    negative, positive = label_continuations(tok, app.prompt(rows[0]["text"]), app.labels)[1]
    # Every " positive" token costs ~log(len) nats; " negative" pays ~1e3 on its first token.
    assert negative[0] not in positive
    res = app_accuracy(_Rigged(model, positive), tok, app, rows, return_predictions=True,
                       progress=False)
    assert set(res["predictions"]) == {"positive"}
    share = sum(r["label"] == "positive" for r in rows) / len(rows)
    assert res["accuracy"] == pytest.approx(share)


def test_plan_jobs_shares_forwards_between_labels() -> None:
    jobs = plan_jobs(0, [1, 2, 3], [[7], [8], [9, 10], [9, 10, 11]])
    assert len(jobs) == 1  # every need is a prefix of [1, 2, 3, 9, 10]
    assert jobs[0].ids == (1, 2, 3, 9, 10)
    assert sorted(jobs[0].queries) == [(0, 2, 7), (1, 2, 8), (2, 2, 9), (2, 3, 10), (3, 2, 9),
                                       (3, 3, 10), (3, 4, 11)]
    assert len(plan_jobs(0, [1], [[5, 6], [7, 8]])) == 2


def test_macro_f1_by_hand() -> None:
    gold = ["a", "a", "b", "b", "c"]
    pred = ["a", "b", "b", "b", "a"]
    # F1(a) = 2/4, F1(b) = 4/5, F1(c) = 0
    assert macro_f1(gold, pred) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert macro_f1(gold, gold) == 1.0
    assert macro_f1(["a"], ["a"], labels=["a", "z"]) == 0.5


def test_evaluate_on_fixtures(model: torch.nn.Module, tok: Tokenizer) -> None:
    res = evaluate(model, tok, data_root=FIXTURES, ppl_tokens=100, app_examples=5, context=64,
                   progress=False)
    assert set(res["perplexity"]) == {"wiki", "news"} and set(res["apps"]) == set(APPS)
    assert res["perplexity"]["wiki"]["tokens"] == 100
    assert all(r["n"] == 5 for r in res["apps"].values())
    table = format_table(res)
    assert "ppl/wiki" in table and "acc/news-topic" in table and "mean accuracy" in table
    with pytest.raises(ValueError, match="unknown apps"):
        evaluate(model, tok, data_root=FIXTURES, ppl=(), tasks=["nope"], progress=False)
    # "all" is the foundation's five apps; a held-out app is scored when named.
    held = evaluate(model, tok, data_root=FIXTURES, ppl=(), tasks=["health-source"], app_examples=4,
                    progress=False)["apps"]
    assert list(held) == ["health-source"] and held["health-source"]["n"] == 4
    assert "health-source" not in res["apps"]
    assert model.training is False
