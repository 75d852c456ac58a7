"""ONNX Runtime GenAI runs moeopt's artifacts: `lower` writes genai_config.json (listed and hashed in the
manifest), and `onnxruntime_genai.Model(ARTIFACT)` decodes greedily to the tokens moeopt's runtime picks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moeopt.lower.genai import GENAI_CONFIG, TOKENIZER_CONFIG, unsupported
from moeopt.runtime import Session
from moeopt.runtime.manifest import read_manifest
from tests.lower_helpers import artifact, manifest

FIXTURES = Path(__file__).parent / "fixtures"
# The `test` extra installs onnxruntime-genai 0.18.0 (CPU wheels: Python 3.11-3.13, x86-64 and aarch64 Linux);
# only where pip has no wheel for the platform is the run skipped.
NO_WHEEL = "onnxruntime-genai is not installed (no 0.18.0 wheel for this platform or Python; the test extra has it)"


def genai_greedy(art: Path, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy tokens GenAI generates after `prompt` (stopping at eos, as moeopt does)."""
    og = pytest.importorskip("onnxruntime_genai", reason=NO_WHEEL)
    model = og.Model(str(art))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([prompt], dtype=np.int32))
    out: list[int] = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out


def moeopt_greedy(art: Path, prompt: list[int], new_tokens: int) -> list[int]:
    """What `moeopt run ART --ids PROMPT` generates (greedy, stopping at the manifest's eos)."""
    g = Session(art).generate(np.array([prompt], dtype=np.int64), new_tokens)
    return [int(t) for t in g.sequences[0, len(prompt):]]


def test_lower_writes_genai_config_into_the_hashed_file_list(tmp_path_factory: pytest.TempPathFactory) -> None:
    art = artifact("mixtral", tmp_path_factory)
    m = manifest(art)
    assert m["genai"] == {"config": GENAI_CONFIG, "files": [GENAI_CONFIG, TOKENIZER_CONFIG]}
    assert {GENAI_CONFIG, TOKENIZER_CONFIG} <= set(m["files"])
    read_manifest(art, verify=True)  # the hashes cover them
    cfg = json.loads((art / GENAI_CONFIG).read_text())["model"]
    cache = m["graph"]["kv_cache"]
    assert cfg["decoder"]["filename"] == m["graph"]["file"]
    assert (cfg["decoder"]["num_hidden_layers"], cfg["decoder"]["num_key_value_heads"], cfg["decoder"]["head_size"]) \
        == (cache["num_layers"], cache["key_heads"], cache["key_dim"])
    assert (cfg["eos_token_id"], cfg["vocab_size"]) == (3, m["vocab_size"])


def test_artifacts_genai_cannot_drive_carry_the_reason_and_no_config(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    offload = json.loads((FIXTURES / "tiny-artifact-offload" / "manifest.json").read_text())
    assert "offload artifact" in str(unsupported(offload))
    switch = artifact("switch_transformers", tmp_path_factory)
    assert manifest(switch)["genai"]["config"] is None and "encoder-decoder" in manifest(switch)["genai"]["reason"]
    assert not (switch / GENAI_CONFIG).exists()
    resident = json.loads((FIXTURES / "tiny-artifact" / "manifest.json").read_text())
    assert unsupported(resident) is None
    resident["graph"]["kv_cache"]["value_dim"] = 4  # MLA-like: values narrower than keys
    assert "differ in shape" in str(unsupported(resident))


@pytest.mark.parametrize("name", ["mixtral", "mixtral_q4"])  # float MoE; 4-bit QMoE with the BPE tokenizer
def test_genai_greedy_tokens_equal_moeopts(name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    og = pytest.importorskip("onnxruntime_genai", reason=NO_WHEEL)
    art = artifact(name, tmp_path_factory)
    vocab = manifest(art)["vocab_size"]
    for prompt in ([5, 17, 33, 2, 9, 40], [11]):
        prompt = [p % vocab for p in prompt]
        assert genai_greedy(art, prompt, 12) == moeopt_greedy(art, prompt, 12), (name, prompt)
    # a batch of two (same length: GenAI infers padding from pad ids), no stop at eos on either side
    batch = np.array([[5, 17, 33, 2, 9, 40], [60, 1, 8, 22, 14, 7]]) % vocab
    og_model = og.Model(str(art))
    params = og.GeneratorParams(og_model)
    params.set_search_options(max_length=batch.shape[1] + 10, min_length=batch.shape[1] + 10, batch_size=2)
    gen = og.Generator(og_model, params)
    gen.append_tokens(batch.astype(np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    want = Session(art).generate(batch, 10, stop_tokens=()).sequences
    assert np.array_equal(np.stack([gen.get_sequence(i) for i in range(2)]), want), name


def test_genai_tokenizer_reads_the_artifacts_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> None:
    og = pytest.importorskip("onnxruntime_genai", reason=NO_WHEEL)
    from tokenizers import Tokenizer

    art = artifact("mixtral_q4", tmp_path_factory)
    ref = Tokenizer.from_file(str(art / "tokenizer.json"))
    tok = og.Tokenizer(og.Model(str(art)))
    text = "The quick brown fox, 123 times!"
    ids = [int(t) for t in tok.encode(text)]
    assert ids == ref.encode(text).ids  # `moeopt run --prompt` encodes with tokenizers
    assert tok.decode(np.array(ids, dtype=np.int32)) == ref.decode(ids) == text
    # from the text prompt, the tokens `moeopt run --prompt` prints (the random model's bytes are not
    # always valid UTF-8, where the two decoders differ: tokens, not text, are compared)
    assert genai_greedy(art, ids, 8) == moeopt_greedy(art, ids, 8)
