"""Offload mode of `lower` and the segment driver: an offload artifact run with every cold expert resident
(`AllResident`) decodes exactly like the resident artifact of the same model.

Tolerance: max abs logit difference 1e-5 over 32 greedy steps (the hot and cold nodes add the same
per-expert products in another order; measured ~1e-7), greedy tokens identical; batch 1 and a
left-padded batch 2, prompt lengths the export did not see. Each export takes about a minute.
"""

from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from filelock import FileLock

from moeopt.errors import BadInputError, UnsupportedModelError
from moeopt.ir.model import MoEModel
from moeopt.ir.predictor import RoutingPredictor
from moeopt.ir.spec import ExpertSpec, RouterSpec
from moeopt.ir.table import SlotInfo
from moeopt.lower import lower
from moeopt.lower.offload import choose_hot
from moeopt.lower.offload_graph import check_offloadable
from moeopt.quant.apply import quantize_slot
from moeopt.runtime import AllResident, OffloadSession, Session, open_artifact
from moeopt.runtime.offload_format import OffloadIndex
from tests.lower_helpers import artifact, left_padded_batch, manifest, random_layer, source_model

STEPS = 32
TOL = 1e-5
# 4- and 2-bit: two cold formats, both with fp32 activations in either kernel path (exact). Not 8-bit: its
# resident QMoE (prepacked initializers) runs int8 activations while the cold graph (weights as inputs) runs
# fp32 ones, measured 1.5e-4 apart on the logits (tokens equal); the cold path is the exact one (4e-8 vs PyTorch).
MIXED = "quantize{method=uniform,bits=4,group=16,pin=0:1@2;0:3@2;1:0@2}"


def best_first(top: Any, hot: set[int]) -> list[int]:
    """The cold experts of a (..., m) hint, in the order the driver must hint them: every token's first
    choice, then every token's second, ..., each once."""
    rows = np.asarray(top).reshape(-1, np.asarray(top).shape[-1])
    out: list[int] = []
    for rank in range(rows.shape[1]):
        for row in rows:
            e = int(row[rank])
            if e not in hot and e not in out:
                out.append(e)
    return out


def predictor_artifact(out: Path, layers: int, seed: int, table_width: int = 2, prefetch_top: int | None = None,
                       first: bool = False, **heads: Any) -> tuple[MoEModel, torch.Tensor, dict[str, Any]]:
    """A tiny Mixtral of `layers` MoE layers with a routing predictor (`heads`: `RoutingPredictor`'s head
    arguments; `first`: also a head for the first layer's experts) and a random token table of
    `table_width` experts per token, lowered to `out` in offload mode with one hot expert per layer:
    (model, table, manifest)."""
    import transformers

    import moeopt
    from moeopt.testing import tiny_config

    cfg = tiny_config("mixtral")
    cfg.num_hidden_layers = layers
    torch.manual_seed(seed)
    model = moeopt.load(transformers.MixtralForCausalLM(cfg).eval())
    d, e = cfg.hidden_size, cfg.num_local_experts
    if first:
        heads["first_experts"] = e
    model.predictor = RoutingPredictor(d, [e] * (layers - 1), 8, "hidden", **heads).eval()
    table = torch.stack([torch.randperm(e, generator=torch.Generator().manual_seed(t))[:table_width]
                         for t in range(cfg.vocab_size)])  # (V, width): token -> layer-0 experts
    model.predictor.set_next_table(table)
    lower(model, out, pipeline="test", experts="offload", hot=1, prefetch_top=prefetch_top)
    return model, table, manifest(out)


def _root(factory: pytest.TempPathFactory) -> Path:
    base = factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "moeopt-artifacts"
    root.mkdir(exist_ok=True)
    return root


def _model(quantized: bool, factory: pytest.TempPathFactory, predictor: bool = False) -> MoEModel:
    model = source_model("mixtral", artifact("mixtral", factory))  # the reference-like tiny Mixtral (tied embeddings)
    if quantized:
        from moeopt.passes import PassManager

        PassManager(MIXED, verify_each=True).run(model)
    if predictor:  # an untrained routing predictor: hints are wrong but well-formed, and must not change outputs
        torch.manual_seed(0)
        model.predictor = RoutingPredictor(model.config.hidden_size, [4], 8, "hidden").eval()
    return model


def _built(name: str, quantized: bool, factory: pytest.TempPathFactory, predictor: bool = False, **kw: Any) -> Path:
    """An artifact of the tiny Mixtral (float, or after MIXED) lowered with `kw`, built once per session."""
    if name == "mixtral":
        return artifact("mixtral", factory)
    out = _root(factory) / f"offload-{name}"
    with FileLock(str(out) + ".lock"):
        if not (out / "manifest.json").exists():
            lower(_model(quantized, factory, predictor), out, pipeline="test", **kw)
    return out


def _assert_same_decode(resident: Path, offload: Path, **session_kw: Any) -> OffloadSession:
    ref, sess = Session(resident), OffloadSession(offload, **session_kw)
    for lengths in ([6], [9, 4]):
        ids, mask = left_padded_batch(lengths)
        want = ref.generate(ids, STEPS, attention_mask=mask, stop_tokens=(), keep_logits=True)
        got = sess.generate(ids, STEPS, attention_mask=mask, stop_tokens=(), keep_logits=True)
        assert np.array_equal(got.sequences, want.sequences), lengths
        assert np.abs(np.stack(got.step_logits) - np.stack(want.step_logits)).max() <= TOL, lengths
    return sess


def _check_index(art: Path) -> OffloadIndex:
    """Every cold expert once, page-aligned records inside the file, the file as long as the index says."""
    m = manifest(art)
    index = OffloadIndex.from_manifest(m)
    cold = {(li, s) for li, la in enumerate(m["layers"]) for s in range(len(la["bits"])) if s not in index.hot[li]}
    assert len(m["offload"]["experts"]) == len(index.experts) and set(index.experts) == cold
    spans = sorted((r.offset, r.offset + index.formats[r.format].record_bytes) for r in index.experts.values())
    assert all(start % index.page == 0 and end <= index.file_bytes for start, end in spans)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))  # no overlap
    assert (art / index.file).stat().st_size == index.file_bytes == (spans[-1][1] if spans else 0)
    for name, fmt in index.formats.items():
        assert (art / fmt.graph).is_file() and fmt.graph in m["files"], name
    assert {s["file"] for s in m["offload"]["segments"]} <= set(m["files"]) and "experts.bin" in m["files"]
    return index


class Hints(AllResident):
    """AllResident that records the prefetch requests it gets."""

    def __init__(self, index: OffloadIndex, artifact: Path) -> None:
        super().__init__(index, artifact)
        self.hints: list[tuple[int, list[int]]] = []

    def hint(self, layer: int, slots: Any) -> None:
        self.hints.append((layer, list(slots)))


def test_float_offload_decodes_like_resident(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    resident = _built("mixtral", False, tmp_path_factory)
    offload = _built("float-hot1", False, tmp_path_factory, predictor=True, experts="offload", hot=1)
    m = manifest(offload)
    index = _check_index(offload)
    assert all(len(h) == 1 for h in index.hot) and list(index.formats) == ["moe-f32"]
    segments = m["offload"]["segments"]
    assert len(segments) == len(index.top_k) + 1 and segments[-1]["outputs"] == ["logits"]
    assert m["offload"]["prefetch"]["outputs"] == {"1": "prefetch.layer1"}
    assert m["offload"]["prefetch"]["top"] == 2  # by default a hint names as many experts as the router picks
    assert "prefetch.layer1" in segments[0]["outputs"]  # hints come out of the first segment
    sess = _assert_same_decode(resident, offload, source=Hints)
    assert sess.timing.cold_runs > 0 and sess.timing.steps == 2 * STEPS
    hints = sess.source.hints  # type: ignore[attr-defined]
    # the predictor names 2 of 4 experts and layer 1 has 1 hot slot: every step hints a cold one
    assert len(hints) == 2 * STEPS and all(j == 1 and set(s) <= set(index.cold(1)) and s for j, s in hints)
    assert isinstance(open_artifact(offload), OffloadSession) and type(open_artifact(resident)) is Session
    with pytest.raises(BadInputError, match="offload artifact"):
        Session(offload)
    # a truncated expert file is one line naming it
    broken = tmp_path / "broken"
    shutil.copytree(offload, broken)
    with (broken / "experts.bin").open("r+b") as f:
        f.truncate(index.file_bytes - 1)
    with pytest.raises(BadInputError, match=r"expert file \S*experts\.bin is truncated") as err:
        OffloadSession(broken, verify=False)
    assert "\n" not in str(err.value)


def test_lookahead_hints_come_one_segment_ahead(tmp_path: Path) -> None:
    """A 3-layer Mixtral whose predictor has a look-ahead head for layer 2 (read from layer 1's input):
    seg0 hints layers 1 and 2, seg1 hints layer 2 again with the head's answer, and an expert cache that
    follows the hints decodes exactly like every expert resident."""
    from moeopt.lower.prefetch import lookahead_hints_numpy
    from moeopt.runtime.expert_cache import cache_source
    from moeopt.runtime.prefetch import GraphHints

    out = tmp_path / "art"
    model, table, m = predictor_artifact(out, 3, 0, prefetch_top=3, ahead_hidden=6)
    pre, segments = m["offload"]["prefetch"], m["offload"]["segments"]
    assert pre["outputs"] == {"1": "prefetch.layer1", "2": "prefetch.layer2"}
    assert pre["ahead"] == {"2": "prefetch.ahead2"} and pre["next"] == {"0": "prefetch.next0"}
    assert "prefetch.ahead2" in segments[1]["outputs"] and "prefetch.layer2" in segments[0]["outputs"]
    assert "prefetch.next0" in segments[-1]["outputs"]
    sess = OffloadSession(out, source=Hints, token_hints=False)  # the graph's hints only
    ids, mask = left_padded_batch([5])
    want = sess.generate(ids, 6, attention_mask=mask, stop_tokens=(), keep_logits=True)
    hints = sess.source.hints  # type: ignore[attr-defined]
    # per step: seg0's two, the head's after seg1, then the next step's layer 0 after the LM head
    assert [j for j, _ in hints] == [1, 2, 2, 0] * 6
    hot0 = set(OffloadIndex.from_manifest(m).hot[0])
    for step, (_, slots) in enumerate(hints[3::4][:-1]):  # the token chosen at each step names its layer 0
        token = int(want.sequences[0, ids.shape[1] + step])
        assert slots == sorted({int(s) for s in table[token].tolist()} - hot0)
    # the head's hint is its top-2 on layer 1's input, minus layer 2's hot slot
    vals: dict[str, Any] = {}
    orig = sess._segment

    def keep(k: int, v: dict[str, Any]) -> None:
        orig(k, v)
        vals.update(v)

    sess._segment = keep  # type: ignore[method-assign]
    sess.source.hints.clear()  # type: ignore[attr-defined]
    sess.generate(ids, 1, attention_mask=mask, stop_tokens=())
    # lowered with prefetch-top 3 (one more than the router's top_k), best first
    assert pre["top"] == 3 and m["offload"]["prefetch"]["k"] == {"1": 3, "2": 3}
    top = lookahead_hints_numpy(vals["moe1.x"], model.predictor, 2, top=3)
    hot = set(OffloadIndex.from_manifest(m).hot[2])
    assert sess.source.hints[-2] == (2, best_first(top, hot))  # type: ignore[attr-defined]
    # a source's hint_width keeps each token's first experts: the head's top-2 of the same input
    sess.source.hint_width = 2  # type: ignore[misc]
    sess.source.hints.clear()  # type: ignore[attr-defined]
    sess.generate(ids, 1, attention_mask=mask, stop_tokens=())
    assert sess.source.hints[-2] == (2, best_first(top[..., :2], hot))  # type: ignore[attr-defined]
    assert len(np.unique(top[..., :2])) < len(np.unique(top))  # the narrower hint is a different one
    cached = OffloadSession(out, source=cache_source(OffloadIndex.from_manifest(m).min_budget() * 2,
                                                      prefetcher=GraphHints()))
    got = cached.generate(ids, 6, attention_mask=mask, stop_tokens=(), keep_logits=True)
    assert np.array_equal(got.sequences, want.sequences)
    assert np.abs(np.stack(got.step_logits) - np.stack(want.step_logits)).max() == 0.0
    assert cached.source.counters.prefetch_issued > 0  # type: ignore[attr-defined]
    cached.close()


def test_token_table_hints_layer_0_of_the_token_fed(tmp_path: Path) -> None:
    """The artifact carries the next-token table as a file, and before each decode step's first segment
    the driver hints layer 0's experts of the token it feeds. Under sampling that token is often not the
    argmax the last segment's hint looked up; a cache following the hints still samples exactly what every
    expert resident does, and a corrupt table is a one-line error."""
    from moeopt.runtime.expert_cache import cache_source
    from moeopt.runtime.prefetch import GraphHints
    from moeopt.runtime.sampling import Sampler

    out = tmp_path / "art"
    model, _, m = predictor_artifact(out, 3, 0, table_width=3)
    assert m["offload"]["prefetch"]["token"] == {"0": "prefetch-token0.npy"}
    table = np.load(out / "prefetch-token0.npy")
    assert table.dtype == np.int16  # the graph's width: the router's top_k columns of the predictor's table
    assert np.array_equal(table, model.predictor.next_table[:, :2].numpy())
    hot0 = set(OffloadIndex.from_manifest(m).hot[0])
    ids, mask = left_padded_batch([5])
    sampler = Sampler(do_sample=True, temperature=2.0, seed=3)
    sess = OffloadSession(out, source=Hints)
    want = sess.generate(ids, 6, attention_mask=mask, stop_tokens=(), keep_logits=True, sampler=sampler)
    hints = sess.source.hints  # type: ignore[attr-defined]
    # prefill: seg0's layer 1 and 2, then the next step's layer 0 after the LM head; each decode step first
    # hints layer 0 from the token it feeds
    assert [j for j, _ in hints] == [1, 2, 0] + [0, 1, 2, 0] * 5
    corrected = 0
    for step in range(5):
        argmax_hint, token_hint = hints[2 + 4 * step], hints[3 + 4 * step]
        token = int(want.sequences[0, ids.shape[1] + step])
        assert token_hint == (0, best_first(table[token], hot0))
        corrected += token_hint != argmax_hint
    assert corrected > 0  # sampling fed a token other than the argmax at least once
    index = OffloadIndex.from_manifest(m)
    cached = OffloadSession(out, source=cache_source(index.min_budget() * 2, prefetcher=GraphHints()))
    got = cached.generate(ids, 6, attention_mask=mask, stop_tokens=(), keep_logits=True, sampler=sampler)
    assert np.array_equal(got.sequences, want.sequences)
    assert np.abs(np.stack(got.step_logits) - np.stack(want.step_logits)).max() == 0.0
    cached.close()
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "prefetch-token0.npy").write_bytes(b"not a table")
    with pytest.raises(BadInputError, match=r"prefetch-token0\.npy: unreadable token table") as err:
        OffloadSession(broken, verify=False)
    assert "\n" not in str(err.value)


def test_early_head_hints_the_next_steps_layer_0_from_the_last_router(tmp_path: Path) -> None:
    """With an early head the artifact names the next step's layer-0 experts from the segment that ends at
    the last MoE layer's router, before the LM head's table does: each step hints 1, 2 (seg0), 2 (seg1's
    look-ahead), 0 (seg2: the early head on the last position of layer 2's input) and 0 (the table). The
    hint is the head's own top-2 minus the hot slot, a cache that follows it decodes exactly like every
    expert resident, and ``early_hints=False`` drops only that hint."""
    from moeopt.runtime.expert_cache import cache_source
    from moeopt.runtime.prefetch import GraphHints

    out = tmp_path / "art"
    model, _, m = predictor_artifact(out, 3, 2, ahead_hidden=6, early_hidden=5, first=True)
    pre, segments = m["offload"]["prefetch"], m["offload"]["segments"]
    assert pre["early"] == {"0": "prefetch.early0"}
    assert "prefetch.early0" in segments[2]["outputs"]  # the segment that ends at layer 2's router
    sess = OffloadSession(out, source=Hints, token_hints=False)
    vals: dict[str, Any] = {}
    early: list[np.ndarray] = []
    orig = sess._segment

    def keep(k: int, v: dict[str, Any]) -> None:
        orig(k, v)
        vals.update(v)
        if k == 2:
            early.append(v["moe2.x"][-1:].copy())

    sess._segment = keep  # type: ignore[method-assign]
    ids, mask = left_padded_batch([5])
    want = sess.generate(ids, 4, attention_mask=mask, stop_tokens=(), keep_logits=True)
    hints = sess.source.hints  # type: ignore[attr-defined]
    assert [j for j, _ in hints] == [1, 2, 2, 0, 0] * 4
    hot0 = set(OffloadIndex.from_manifest(m).hot[0])
    for step, x in enumerate(early):
        with torch.no_grad():
            top = model.predictor.early_logits(torch.from_numpy(x)).topk(2, dim=-1).indices
        assert hints[3 + 5 * step] == (0, best_first(top.numpy(), hot0))
    plain = OffloadSession(out, source=Hints, token_hints=False, early_hints=False)
    plain.generate(ids, 4, attention_mask=mask, stop_tokens=())
    assert [j for j, _ in plain.source.hints] == [1, 2, 2, 0] * 4  # type: ignore[attr-defined]
    index = OffloadIndex.from_manifest(m)
    cached = OffloadSession(out, source=cache_source(index.min_budget() * 2, prefetcher=GraphHints()))
    got = cached.generate(ids, 4, attention_mask=mask, stop_tokens=(), keep_logits=True)
    assert np.array_equal(got.sequences, want.sequences)
    assert np.abs(np.stack(got.step_logits) - np.stack(want.step_logits)).max() == 0.0
    assert cached.source.counters.prefetch_issued > 0  # type: ignore[attr-defined]
    cached.close()


def test_quantized_offload_with_two_formats_decodes_like_resident(tmp_path_factory: pytest.TempPathFactory) -> None:
    resident = _built("q48-resident", True, tmp_path_factory)
    offload = _built("q48-hot0", True, tmp_path_factory, experts="offload", hot=0)
    index = _check_index(offload)
    assert index.hot == ((), ()) and len(index.experts) == 8
    assert sorted(f.op for f in index.formats.values()) == ["com.microsoft.QMoE"] * 2  # 4-bit and 8-bit
    assert manifest(offload)["graph"]["ops"] == {}  # hot=0: no expert node left in the segments
    _assert_same_decode(resident, offload)
    sess = _assert_same_decode(resident, offload, max_chunk=1)  # one expert per cold run
    assert sess.timing.cold_runs == sess.timing.cold_experts > 0


def test_hot_all_has_no_cold_experts(tmp_path_factory: pytest.TempPathFactory) -> None:
    resident = _built("mixtral", False, tmp_path_factory)
    offload = _built("float-hot-all", False, tmp_path_factory, experts="offload", hot=None)
    index = _check_index(offload)
    assert not index.formats and not index.experts and index.file_bytes == 0
    assert not list(offload.glob("cold_*.onnx"))
    sess = _assert_same_decode(resident, offload)
    assert sess.timing.cold_runs == 0


def test_hot_slots_follow_importance_then_the_plan() -> None:
    import moeopt
    from moeopt.testing import tiny_model

    model = moeopt.load(tiny_model("mixtral"))
    assert choose_hot(model, 2) == {0: (0, 1), 1: (0, 1)}
    t = model.layers[1].table
    t.slots = [SlotInfo(s.members, s.bits, imp) for s, imp in zip(t.slots, [0.1, 0.5, 0.2, 0.9], strict=True)]
    assert choose_hot(model, 2)[1] == (1, 3) and choose_hot(model, None)[1] == (0, 1, 2, 3)
    model.plan = {"hot": [[3], [2, 0]]}  # type: ignore[attr-defined]
    assert choose_hot(model, 2) == {0: (3,), 1: (0, 2)}


def test_matmulnbits_groups_cannot_be_offloaded() -> None:
    layer = random_layer(RouterSpec(4, 2), ExpertSpec(32, 24, "gelu"))  # QMoE has no exact GELU
    for s, bits in enumerate([4, 4, None, 8]):
        quantize_slot(layer.table, s, bits, 16, False)
    refused = r"layer 0: slots \[0, 1\] lower to com.microsoft.MatMulNBits"
    with pytest.raises(UnsupportedModelError, match=refused) as err:
        check_offloadable([layer], {0: (2,)})
    assert "\n" not in str(err.value) and "gelu" in str(err.value)
    with pytest.raises(UnsupportedModelError, match="layer 0: slots \\[2\\] lower to onnx-ops"):
        check_offloadable([layer], {0: (0, 1, 3)})  # the float slot: ORT's MoE has no GELU GLU either
    check_offloadable([layer], {0: (0, 1, 2, 3)})  # all hot: nothing to offload, nothing refused


def test_lower_pass_options(tmp_path: Path) -> None:
    import moeopt
    from moeopt.errors import MoeOptError
    from moeopt.passes import PassManager
    from moeopt.testing import tiny_model

    text = f"lower{{out={tmp_path / 'a'},experts=offload,hot=all,prefetch=false}}"
    assert PassManager(text).pipeline.text() == text
    with pytest.raises(MoeOptError, match=r"'hot' .* a number or 'all', got 'many'"):
        PassManager(f"lower{{out={tmp_path / 'b'},experts=offload,hot=many}}").run(moeopt.load(tiny_model("mixtral")))
    assert not (tmp_path / "b").exists()
    with pytest.raises(MoeOptError, match="prefetch-top"):
        PassManager(f"lower{{out={tmp_path / 'c'},experts=offload,prefetch-top=-1}}")
    from moeopt.passes.lower import Lower

    with pytest.raises(MoeOptError, match=r"'prefetch-top' of pass 'lower' must be in \[0, inf\], got '-1'"):
        Lower(out=tmp_path / "c", prefetch_top=-1)  # keywords from the API (and the CLI) are range-checked too


def test_far_hints_come_two_layers_ahead(tmp_path: Path) -> None:
    """A 4-layer Mixtral whose predictor has far heads: layer 3's comes out of seg1 (layer 1's input), the
    next step's layers 0 and 1 out of seg2 and seg3 (from the last position), so each step hints
    1,2,3 (seg0) 2,3 (seg1) 3,0 (seg2) 1 (seg3) 0 (the LM head's table); a cache that takes hints two
    layers ahead decodes exactly like every expert resident."""
    from moeopt.runtime.expert_cache import cache_source
    from moeopt.runtime.prefetch import GraphHints

    out = tmp_path / "art"
    model, _, m = predictor_artifact(out, 4, 1, ahead_hidden=6, far_hidden=5, first=True)
    pre, segments = m["offload"]["prefetch"], m["offload"]["segments"]
    assert pre["far"] == {"3": "prefetch.far3"}
    assert pre["next_far"] == {"0": "prefetch.far0", "1": "prefetch.far1"}
    for k, name in ((1, "prefetch.far3"), (2, "prefetch.far0"), (3, "prefetch.far1")):
        assert name in segments[k]["outputs"]
    sess = OffloadSession(out, source=Hints, token_hints=False)  # the graph's hints only
    ids, mask = left_padded_batch([5])
    last2: list[np.ndarray] = []
    orig = sess._segment

    def keep(k: int, v: dict[str, Any]) -> None:
        orig(k, v)
        if k == 2:
            last2.append(v["moe2.x"][-1:].copy())

    sess._segment = keep  # type: ignore[method-assign]
    want = sess.generate(ids, 4, attention_mask=mask, stop_tokens=(), keep_logits=True)
    hints = sess.source.hints  # type: ignore[attr-defined]
    assert [j for j, _ in hints] == [1, 2, 3, 2, 3, 3, 0, 1, 0] * 4
    # each step's far hint of layer 0 (the prompt's too): the head's top-2 on the last position of
    # layer 2's input
    hot0 = set(OffloadIndex.from_manifest(m).hot[0])
    for step, x in enumerate(last2):
        with torch.no_grad():
            top = model.predictor.far_logits(0, torch.from_numpy(x)).topk(2, dim=-1).indices
        assert hints[6 + 9 * step] == (0, best_first(top.numpy(), hot0))
    index = OffloadIndex.from_manifest(m)
    for depth in (1, 2):
        cached = OffloadSession(out, source=cache_source(index.min_budget() * 2, prefetcher=GraphHints(depth=depth)))
        got = cached.generate(ids, 4, attention_mask=mask, stop_tokens=(), keep_logits=True)
        assert np.array_equal(got.sequences, want.sequences)
        assert np.abs(np.stack(got.step_logits) - np.stack(want.step_logits)).max() == 0.0
        assert cached.source.counters.prefetch_issued > 0  # type: ignore[attr-defined]
        cached.close()
