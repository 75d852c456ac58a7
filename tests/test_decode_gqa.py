"""GroupQueryAttention decoder graphs (`lower{attention=gqa}`): same greedy tokens as PyTorch and as the
numpy past/present path, the KV buffer updated in place, and the exported graph kept where not covered."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import transformers

import moeopt
from moeopt.errors import BadInputError, UnsupportedModelError
from moeopt.lower import lower
from moeopt.lower.export import attention_kind
from moeopt.runtime import Session
from moeopt.runtime.steppers import DecoderOnlyStepper
from moeopt.testing import tiny_config


def _mixtral_hd16() -> transformers.PreTrainedModel:
    """Tiny Mixtral with head_dim 16 (ORT's CPU GroupQueryAttention needs a multiple of 16) and norms
    that are not all ones (so a fused norm that dropped its weight would show)."""
    cfg = tiny_config("mixtral")
    cfg.hidden_size = 64
    torch.manual_seed(0)
    hf = transformers.MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "gate.weight" in n:
                p.normal_(0.0, 0.5)
            if n.endswith("norm.weight"):
                p.normal_(1.0, 0.2)
    return hf


@pytest.fixture(scope="module")
def gqa_art(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, transformers.PreTrainedModel]:
    torch.set_num_threads(1)
    hf = _mixtral_hd16()
    out = tmp_path_factory.mktemp("gqa") / "art"
    lower(moeopt.load(hf), out, attention="auto")  # verified at lower time against PyTorch
    return out, hf


def test_gqa_graph_and_manifest(gqa_art: tuple[Path, transformers.PreTrainedModel]) -> None:
    art, _ = gqa_art
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["graph"]["attention"] == "gqa"
    assert manifest["verified"] and manifest["parity_measured"] <= 1e-5
    ops = manifest["graph"]["ops"]
    assert ops["com.microsoft.GroupQueryAttention"] == 2
    assert ops["com.microsoft.SkipSimplifiedLayerNormalization"] >= 2
    graph = onnx.load(str(art / "model.onnx"), load_external_data=False).graph
    kinds = {n.op_type for n in graph.node}
    assert not kinds & {"Pow", "Sqrt", "Reciprocal", "Expand", "Sin", "Cos"}  # norms, cache repeat, rotary
    producers = {o: n.op_type for n in graph.node for o in n.output}
    assert all(producers[o.name] == "GroupQueryAttention" for o in graph.output if o.name.startswith("present."))


def test_gqa_greedy_tokens_equal_pytorch_and_the_unbound_path(
    gqa_art: tuple[Path, transformers.PreTrainedModel],
) -> None:
    art, hf = gqa_art
    sess = Session(art)
    ids = np.random.default_rng(1).integers(0, 97, (2, 6))
    got = sess.generate(ids, 12, stop_tokens=())
    with torch.no_grad():
        ref = hf.generate(torch.from_numpy(ids), attention_mask=torch.ones(2, 6, dtype=torch.long),
                          max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    np.testing.assert_array_equal(got.sequences, ref.numpy())
    # the KV buffers are bound as past and present: each step writes in place, nothing is returned new
    bound = sess.empty_past(2, 20)
    stepper = DecoderOnlyStepper(sess._run, ids, np.ones_like(ids))
    logits_b, present = stepper.prefill(bound)
    assert all(a is b for a, b in zip(present, bound, strict=True))
    # the same graph fed numpy past/present (plain onnxruntime, no binding) gives the same logits
    plain = DecoderOnlyStepper(sess._run, ids, np.ones_like(ids))
    zeros = [np.zeros([*v.shape()[:2], 0, *v.shape()[3:]], np.float32) for v in bound]
    logits_p, grown = plain.prefill(zeros)
    assert grown[0].shape[2] == 6
    np.testing.assert_allclose(logits_b, logits_p, atol=1e-5)
    tok = logits_b[:, -1].argmax(-1)
    np.testing.assert_allclose(stepper.step(tok, present)[0], plain.step(tok, grown)[0], atol=1e-5)


def test_gqa_padding_rules(gqa_art: tuple[Path, transformers.PreTrainedModel]) -> None:
    art, _ = gqa_art
    sess = Session(art)
    ids = np.random.default_rng(2).integers(0, 97, (2, 5))
    right = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    full = sess.logits(ids[1:, :3])
    np.testing.assert_allclose(sess.logits(ids, right)[1, :3], full[0], atol=1e-5)  # eval's right padding
    with pytest.raises(BadInputError):
        sess.logits(ids, right[:, ::-1])
    with pytest.raises(BadInputError):
        sess.generate(ids, 2, attention_mask=right)  # generate's prompts are left-padded
    # a left-padded batch: each row generates the tokens it generates alone
    left = right[:, ::-1].copy()
    got = sess.generate(ids, 6, attention_mask=left, stop_tokens=())
    alone = sess.generate(ids[1:, 2:], 6, stop_tokens=())
    np.testing.assert_array_equal(got.sequences[1, 5:], alone.sequences[0, 3:])
    np.testing.assert_array_equal(got.sequences[0], sess.generate(ids[:1], 6, stop_tokens=()).sequences[0])


def test_attention_kind_keeps_the_exported_graph_where_gqa_is_not_verified() -> None:
    model = moeopt.load(_mixtral_hd16())
    assert attention_kind(model, "auto") == "gqa"
    assert attention_kind(model, "export") == "export"
    assert attention_kind(model, "auto", kv_cache=False) == "export"
    tiny8 = moeopt.load(moeopt.testing.tiny_model("mixtral"))  # head_dim 8
    assert attention_kind(tiny8, "auto") == "export"
    with pytest.raises(UnsupportedModelError, match="multiple of 16"):
        attention_kind(tiny8, "gqa")
    with pytest.raises(UnsupportedModelError, match="verified for"):
        attention_kind(moeopt.load(moeopt.testing.tiny_model("deepseek_v3")), "gqa")  # MLA


def test_qwen3_moe_per_head_qk_norm_goes_through_gqa(tmp_path: Path) -> None:
    """Qwen3-MoE's q/k RMSNorm (per head, before rotary) stays in front of the GroupQueryAttention node."""
    cfg = tiny_config("qwen3_moe")
    cfg.hidden_size, cfg.head_dim = 64, 16
    torch.manual_seed(0)
    hf = transformers.Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith("norm.weight"):
                p.normal_(1.0, 0.2)
    lower(moeopt.load(hf), tmp_path / "art", attention="gqa")
    sess = Session(tmp_path / "art")
    assert sess.attention == "gqa" and sess.manifest["parity_measured"] <= 1e-5
    ids = np.random.default_rng(3).integers(0, 97, (1, 5))
    with torch.no_grad():
        ref = hf.generate(torch.from_numpy(ids), max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    np.testing.assert_array_equal(sess.generate(ids, 8, stop_tokens=()).sequences, ref.numpy())


def test_gqa_artifact_runs_under_genai_with_a_shared_kv_buffer(
    gqa_art: tuple[Path, transformers.PreTrainedModel],
) -> None:
    """The GQA graph updates its cache in place, so GenAI is told past_present_share_buffer; its greedy
    tokens still equal moeopt's runtime (a graph that grew present instead would fail GenAI's shapes)."""
    from tests.test_genai import genai_greedy, moeopt_greedy

    art, _ = gqa_art
    cfg = json.loads((art / "genai_config.json").read_text())
    assert cfg["search"]["past_present_share_buffer"] is True
    prompt = [int(t) for t in np.random.default_rng(3).integers(1, 97, 7)]
    assert genai_greedy(art, prompt, 12) == moeopt_greedy(art, prompt, 12)
