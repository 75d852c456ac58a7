"""The streamed compile (`moeopt convert --stream`): one decoder layer at a time, the same artifact.

On a tiny 3-layer Mixtral in bfloat16 shards: the streamed artifact's experts.bin, segment graphs and
weights, and cold graphs have the sha256 of the in-memory pipeline's (same per-layer computations in
float32, same writers); only parity.npz and the manifest differ, because the streamed reference is one
teacher-forced forward over prompt + the artifact's greedy tokens instead of eight full recomputes (the
tokens must be equal and the logits within 1e-5; measured 6e-8). No more than two decoder layers' experts
are ever materialised (a hook on the reader counts them). A run stopped after layer 1 and started again
with the same command resumes and writes the same bytes. With `quantize{non-experts=4,lm-head=true}` the
attention linears and lm_head (quantized where the streamed compile loads them) give the same bytes too,
as MatMulNBits nodes. Bad input is one line, exit 2, nothing in -o.
Each test that lowers exports once or twice (about 30 s per export on a loaded machine). Experts are read
one at a time wherever a forward or the quantizer needs them (`skeleton.LazySlots`), so peak memory is one
expert in float32 plus the non-expert weights the export holds.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from moeopt.stream import stream_compile
from moeopt.stream.compile import FAIL_ENV, InjectedFailure
from moeopt.stream.plan import stream_plan
from moeopt.stream.reader import LayerBudgetError, LazyCheckpoint
from tests.test_cli import one_line_exit_2, run_cli

LAYERS = 3


MERGE = "prune{keep=0.5,cold=0.25},match,merge"  # 4 experts: 2 hot, 1 moderate folded into one, 1 cold


def pipeline(calib: Path, keep: float = 0.5, hot: int = 0, merge: str | None = None) -> str:
    prune = merge if merge is not None else f"prune{{keep={keep}}}"
    return (f"importance{{calib={calib},seq-len=16,max-tokens=256}},{prune},"
            f"quantize{{method=uniform,bits=4,group=16}},lower{{experts=offload,hot={hot}}}")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 3-layer Mixtral in bfloat16, in several shards with an index, plus calibration token ids."""
    import transformers

    from moeopt.testing import tiny_config

    root = tmp_path_factory.mktemp("stream")
    cfg = tiny_config("mixtral")
    cfg.num_hidden_layers = LAYERS
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate.weight" in name:  # distinct router preferences, so that importance ranks experts apart
                p.normal_(0.0, 0.5)
    path = root / "tiny-mixtral"
    model.to(torch.bfloat16).save_pretrained(path, max_shard_size="40KB")
    g = torch.Generator().manual_seed(1)
    rows = [json.dumps({"ids": torch.randint(0, cfg.vocab_size, (64,), generator=g).tolist()}) for _ in range(8)]
    (root / "calib.jsonl").write_text("\n".join(rows))
    CALIB["path"] = root / "calib.jsonl"
    return path


CALIB: dict[str, Path] = {}


def _calib(ckpt: Path) -> Path:
    return CALIB["path"]


def _hashes(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir()) if f.is_file()}


@pytest.fixture(scope="module")
def streamed(ckpt: Path) -> tuple[Path, list[frozenset[int]], Any]:
    """The streamed artifact, every set of materialised layers seen, and the run's report."""
    torch.set_num_threads(1)
    seen: list[frozenset[int]] = []
    out = ckpt.parent / "streamed"
    report = stream_compile(ckpt, pipeline(_calib(ckpt)), out, work_dir=ckpt.parent / "streamed.work",
                            hooks=[seen.append])
    return out, seen, report


@pytest.fixture(scope="module")
def in_memory(ckpt: Path) -> Path:
    """The in-memory pipeline's artifact of the same pipeline."""
    ref = ckpt.parent / "in-memory"
    _in_memory(ckpt, ref)
    return ref


def _in_memory(ckpt: Path, out: Path, hot: int = 0, text: str | None = None, merge: str | None = None) -> None:
    """The in-memory pipeline's artifact of `text` (default: `pipeline` with `hot` and `merge`) in `out`."""
    import moeopt
    from moeopt.passes import PassManager

    torch.set_num_threads(1)
    text = pipeline(_calib(ckpt), hot=hot, merge=merge) if text is None else text
    PassManager(text[:-1] + f",out={out}}}").run(moeopt.load(ckpt))


def _same_but_parity(out: Path, ref: Path) -> None:
    got, want = _hashes(out), _hashes(ref)
    assert set(got) == set(want) and "experts.bin" in got and any(n.endswith(".onnx.data") for n in got)
    differ = sorted(n for n in got if got[n] != want[n])
    assert differ == ["manifest.json", "parity.npz"], differ


def test_streamed_equals_in_memory(streamed: tuple[Path, list[frozenset[int]], Any], in_memory: Path) -> None:
    out, _, report = streamed
    ref = in_memory
    got, want = _hashes(out), _hashes(ref)
    assert set(got) == set(want) and "experts.bin" in got and any(n.endswith(".onnx.data") for n in got)
    differ = sorted(n for n in got if got[n] != want[n])
    assert differ == ["manifest.json", "parity.npz"], differ
    a, b = json.loads((out / "manifest.json").read_text()), json.loads((ref / "manifest.json").read_text())
    assert a["offload"] == b["offload"] and a["layers"] == b["layers"] and a["graph"] == b["graph"]
    assert a["verified"] and a["parity_measured"] <= 1e-5 and a["parity_tolerance"] == b["parity_tolerance"]
    pa, pb = np.load(out / "parity.npz"), np.load(ref / "parity.npz")
    assert (pa["prompt"] == pb["prompt"]).all() and (pa["tokens"] == pb["tokens"]).all()
    assert float(np.abs(pa["logits"] - pb["logits"]).max()) <= 1e-5
    assert report.bytes_read > 0 and len(report.layers) == LAYERS


def test_streamed_parity_rule_is_in_memory_rule(streamed: tuple[Path, list[frozenset[int]], Any],
                                                in_memory: Path) -> None:
    """The streamed manifest states its tolerance by the in-memory lowering's measured error model (same
    kind, factor, floor, int8 sites; the simulated diff from the same perturbations in the same order, on a
    reference within 1e-5), and the tolerance is what that rule gives."""
    a = json.loads((streamed[0] / "manifest.json").read_text())
    b = json.loads((in_memory / "manifest.json").read_text())
    ra, rb = a["parity_rule"], b["parity_rule"]
    assert rb["kind"] != "fixed"
    assert {k: ra[k] for k in ("kind", "factor", "floor", "int8_sites")} == \
        {k: rb[k] for k in ("kind", "factor", "floor", "int8_sites")}
    assert 0 < ra["simulated_max_abs_diff"] == pytest.approx(rb["simulated_max_abs_diff"], rel=0.05, abs=1e-5)
    assert a["parity_tolerance"] == max(ra["floor"], ra["factor"] * ra["simulated_max_abs_diff"])
    assert a["verified"] and a["parity_measured"] <= a["parity_tolerance"]


def test_streamed_int8_rule_is_in_memory_rule(ckpt: Path, tmp_path: Path) -> None:
    """At accuracy level 4 (int8 activations at every expert slot) the streamed rule is the in-memory one:
    kind int8-activations, the same sites, the simulated diff of the same rounding (within 5%)."""
    text = pipeline(_calib(ckpt))[:-1] + ",accuracy-level=4}"
    out, ref = tmp_path / "streamed", tmp_path / "in-memory"
    stream_compile(ckpt, text, out)
    import moeopt
    from moeopt.passes import PassManager

    PassManager(text[:-1] + f",out={ref}}}").run(moeopt.load(ckpt))
    a = json.loads((out / "manifest.json").read_text())
    b = json.loads((ref / "manifest.json").read_text())
    ra, rb = a["parity_rule"], b["parity_rule"]
    assert ra["kind"] == rb["kind"] == "int8-activations" and ra["int8_sites"] == rb["int8_sites"]
    assert ra["int8_sites"]["expert_slots"] > 0
    assert ra["simulated_max_abs_diff"] == pytest.approx(rb["simulated_max_abs_diff"], rel=0.05)
    assert a["parity_tolerance"] == max(ra["floor"], ra["factor"] * ra["simulated_max_abs_diff"])
    assert a["verified"] and a["parity_measured"] <= a["parity_tolerance"]


def test_dual_layer_clean_state_is_forward_layer(ckpt: Path, streamed: tuple[Path, list[frozenset[int]], Any]) -> None:
    """The parity sweep's two-state layer (`simulate.dual_layer`, each expert made once for both states)
    leaves the clean state bit-identical to the plain layer forward, and the simulated one apart from it."""
    from moeopt.ir.table import SlotInfo
    from moeopt.lower.onnx_quant import QuantSettings
    from moeopt.stream.simulate import Simulation, dual_layer
    from moeopt.stream.skeleton import StreamSkeleton

    torch.set_num_threads(1)
    states = [json.loads(p.read_text()) for p in sorted((ckpt.parent / "streamed.work").glob("layer-*.json"))]
    sk = StreamSkeleton(ckpt, LazyCheckpoint(ckpt))
    for st in states:
        sk.drop_experts(st["layer"], [SlotInfo.from_dict(d) for d in st["slots"]], st["quantized"])
    sim = Simulation(sk.model, QuantSettings(0, exact=False))
    sk.load_top(embed=True, head=False)
    h = sk.embed(torch.arange(24).reshape(1, 24) * 7 % int(sk.model.config.vocab_size))
    st = states[0]
    slots = [SlotInfo.from_dict(d) for d in st["slots"]]
    sk.load_dense(0)
    made: list[int] = []
    sk.lazy_experts(0, slots, lambda s: (made.append(s), sk.expert(0, slots[s].members[0]))[1])
    want = sk.forward_layer(0, h)
    n_plain, made[:] = len(made), []
    got, got_sim = dual_layer(sk, 0, h, h.clone(), sim)
    assert torch.equal(got, want)
    assert 0 < float((got_sim - got).abs().max()) < 1e-4
    assert len(made) == n_plain == len(set(made)), made  # each used slot made once for both states


def test_streamed_parity_refuses_a_fault(ckpt: Path, streamed: tuple[Path, list[frozenset[int]], Any],
                                         tmp_path: Path) -> None:
    """The streamed parity check (`_parity`, as `lower{verify=true}` and bench/scale_verify.py run it) on
    the artifact against a checkpoint with one router weight changed: the diff is over the stated rule's
    tolerance, so `_lower` refuses it."""
    from safetensors.torch import load_file, save_file

    from moeopt.ir.table import SlotInfo
    from moeopt.lower.onnx_quant import QuantSettings
    from moeopt.stream.compile import _parity
    from moeopt.stream.simulate import Simulation
    from moeopt.stream.skeleton import StreamSkeleton

    out = streamed[0]
    bad = tmp_path / "ckpt"
    shutil.copytree(ckpt, bad)
    name = "model.layers.1.block_sparse_moe.gate.weight"
    for f in sorted(bad.glob("*.safetensors")):
        tensors = load_file(f)
        if name in tensors:
            w = tensors[name].clone()
            w[int(w[:, 0].argmin()), 0] += 8.0  # one weight: the least preferred expert wins some tokens
            tensors[name] = w
            save_file(tensors, f, metadata={"format": "pt"})
    art = tmp_path / "art"
    shutil.copytree(out, art)
    states = [json.loads(p.read_text()) for p in sorted((ckpt.parent / "streamed.work").glob("layer-*.json"))]
    manifest = json.loads((out / "manifest.json").read_text())
    sk = StreamSkeleton(bad, LazyCheckpoint(bad))
    for st in states:
        sk.drop_experts(st["layer"], [SlotInfo.from_dict(d) for d in st["slots"]], st["quantized"])
    sim = Simulation(sk.model, QuantSettings(0, exact=False))
    plan = stream_plan(manifest["pipeline"], art)
    measured, simulated = _parity(sk, states, plan, art, int(manifest["offload"]["file_bytes"]), lambda _m: None, sim)
    tolerance, rule = sim.rule(simulated)
    assert rule["kind"] == manifest["parity_rule"]["kind"]
    assert measured > 2 * tolerance, (measured, tolerance)


def test_hot_slots_equal_in_memory(ckpt: Path, tmp_path: Path) -> None:
    """hot=1: each layer's most important slot lowered into the graph (its packed matrices kept in the work
    folder for the export), the rest in experts.bin: the same bytes as the in-memory pipeline's."""
    out, ref = tmp_path / "streamed", tmp_path / "in-memory"
    stream_compile(ckpt, pipeline(_calib(ckpt), hot=1), out)
    _in_memory(ckpt, ref, hot=1)
    _same_but_parity(out, ref)
    assert all(len(h) == 1 for h in json.loads((out / "manifest.json").read_text())["offload"]["hot"])


def test_merge_resumed_equals_in_memory(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Streamed match + merge (each layer's assignment block solved when the layer is reached, merged
    slots made one at a time from the checkpoint's experts), stopped after layer 0 and resumed (the parity
    sweep remakes layer 0's merged slots from the alignments kept in the work folder): the same bytes as the
    in-memory pipeline's, whose match solves every layer in one program."""
    out, ref, work = tmp_path / "streamed", tmp_path / "in-memory", tmp_path / "work"
    monkeypatch.setenv(FAIL_ENV, "0")
    with pytest.raises(InjectedFailure):
        stream_compile(ckpt, pipeline(_calib(ckpt), merge=MERGE), out, work_dir=work)
    monkeypatch.delenv(FAIL_ENV)
    report = stream_compile(ckpt, pipeline(_calib(ckpt), merge=MERGE), out, work_dir=work)
    assert report.resumed_layers == 1
    _in_memory(ckpt, ref, merge=MERGE)
    _same_but_parity(out, ref)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["verified"] and manifest["parity_measured"] <= 1e-5
    layers = [json.loads(f.read_text()) for f in sorted(work.glob("layer-*.json"))]
    assert [st["stats"]["experts-merged"] for st in layers] == [1] * LAYERS
    for st in layers:  # 2 slots, one holding two experts; the alignment is a permutation of the 48 neurons
        assert sorted(len(s["members"]) for s in st["slots"]) == [1, 2]
        (m,) = st["merges"]
        assert sorted(m["perms"][0]) == list(range(48))


def _nbits_linears(folder: Path) -> list[str]:
    """The module paths of the linears lowered as MatMulNBits in the artifact's segment graphs (their packed
    weights are named `{path}.q.B` by `onnx_linears`)."""
    import onnx

    paths = []
    for f in sorted(folder.glob("*.onnx")):
        for node in onnx.load(str(f), load_external_data=False).graph.node:
            if node.op_type == "MatMulNBits" and node.input[1].endswith(".q.B"):
                paths.append(node.input[1].removesuffix(".q.B"))
    return paths


def test_non_expert_linears_equal_in_memory(ckpt: Path, tmp_path: Path) -> None:
    """quantize{non-experts=4,lm-head=true}: each layer's attention linears quantized when the export and
    the parity sweep load its dense weights, lm_head when they load the top, by the in-memory pass's RTN:
    the same bytes as the in-memory pipeline's (experts.bin, graphs and their weights, cold graphs), the
    same manifest layers/graph/offload/quant, every q/k/v/o projection and lm_head a MatMulNBits node, and
    the streamed parity check (verify=true) passes under the in-memory rule."""
    text = pipeline(_calib(ckpt)).replace("group=16}", "group=16,non-experts=4,lm-head=true}")
    out, ref, work = tmp_path / "streamed", tmp_path / "in-memory", tmp_path / "work"
    stream_compile(ckpt, text, out, work_dir=work)
    _in_memory(ckpt, ref, text=text)
    _same_but_parity(out, ref)
    a, b = json.loads((out / "manifest.json").read_text()), json.loads((ref / "manifest.json").read_text())
    for key in ("offload", "layers", "graph", "quant"):
        assert a[key] == b[key], key
    want = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(LAYERS) for p in "qkvo"] + ["lm_head"]
    assert sorted(a["quant"]["linears"]) == sorted(want)
    assert all(m["bits"] == 4 and m["group_size"] == 16 for m in a["quant"]["linears"].values())
    assert sorted(_nbits_linears(out)) == sorted(want)
    assert a["graph"]["ops"]["com.microsoft.MatMulNBits"] == len(want)
    assert a["parity_rule"]["kind"] == b["parity_rule"]["kind"]
    assert a["parity_rule"]["simulated_max_abs_diff"] == pytest.approx(b["parity_rule"]["simulated_max_abs_diff"],
                                                                       rel=0.05, abs=1e-5)
    assert a["verified"] and a["parity_measured"] <= 1e-5 and a["parity_measured"] <= a["parity_tolerance"]
    pa, pb = np.load(out / "parity.npz"), np.load(ref / "parity.npz")
    assert (pa["tokens"] == pb["tokens"]).all() and float(np.abs(pa["logits"] - pb["logits"]).max()) <= 1e-5
    _check_alone(ckpt, out, work, a)


def _check_alone(ckpt: Path, out: Path, work: Path, manifest: dict[str, Any]) -> None:
    """The parity check run on its own, as bench/scale_verify.py runs it (a fresh skeleton, the linears'
    formats from `linear_stand_ins`, no weight read for them): the formats are the manifest's, the
    tolerance at accuracy level 4 counts every quantized linear as an int8 site, and the check measures
    what the compile measured."""
    from moeopt.ir.table import SlotInfo
    from moeopt.lower.onnx_quant import QuantSettings
    from moeopt.stream.compile import _parity, linear_stand_ins
    from moeopt.stream.simulate import Simulation
    from moeopt.stream.skeleton import StreamSkeleton

    states = [json.loads(p.read_text()) for p in sorted(work.glob("layer-*.json"))]
    art = work.parent / "art"
    shutil.copytree(out, art)
    sk = StreamSkeleton(ckpt, LazyCheckpoint(ckpt))
    for st in states:
        sk.drop_experts(st["layer"], [SlotInfo.from_dict(d) for d in st["slots"]], st["quantized"])
    plan = stream_plan(manifest["pipeline"], art)
    linear_stand_ins(sk, plan)
    assert {p: q.meta() for p, q in sk.model.linears.items()} == manifest["quant"]["linears"]
    assert Simulation(sk.model, QuantSettings(4, exact=False)).counts["linears"] == len(manifest["quant"]["linears"])
    sim = Simulation(sk.model, QuantSettings(0, exact=False))
    measured, simulated = _parity(sk, states, plan, art, int(manifest["offload"]["file_bytes"]), lambda _m: None, sim)
    assert measured == pytest.approx(manifest["parity_measured"], rel=1e-6, abs=1e-9)
    assert sim.rule(simulated)[0] == manifest["parity_tolerance"]


@pytest.mark.parametrize("bits", [3, 4])
def test_expert_rtn_is_in_memory_rtn(ckpt: Path, tmp_path: Path, bits: int) -> None:
    """The streamed per-expert RTN (`_quantize_each`) packs each expert of a layer as the in-memory
    `quantize` pass does: at 4 bits (min/max scales) and at 3, where `scales=auto` searches the scales."""
    import moeopt
    from moeopt.ir.table import SlotInfo
    from moeopt.passes import PassManager
    from moeopt.stream.compile import _quantize_each
    from moeopt.stream.merge import SlotMaker
    from moeopt.stream.skeleton import StreamSkeleton

    text = f"quantize{{method=uniform,bits={bits},group=16}}"
    model = PassManager(text).run(moeopt.load(ckpt)).model
    sk = StreamSkeleton(ckpt, LazyCheckpoint(ckpt))
    plan = stream_plan(text + ",lower{experts=offload,hot=0}", tmp_path / "out")
    want = model.layers[1].table.quantized
    sk.drop_experts(1, [SlotInfo((e,)) for e in range(model.layers[1].table.num_experts)], {}, release=False)
    sk.reader.acquire(1)
    slots = list(sk.model.layers[1].table.slots)
    _quantize_each(sk, 1, bits, plan, SlotMaker(sk, 1, slots, {}, "none"))
    got = sk.model.layers[1].table.quantized
    assert list(got.keys()) == list(want.keys()) and len(got)
    for key, q in want.items():
        g = got[key]
        assert (g.bits, g.group_size) == (q.bits, q.group_size) == (bits, 16)
        for name in ("packed", "scales", "zero_points"):
            assert torch.equal(getattr(g, name), getattr(q, name)), (key, name)


def test_at_most_two_layers_materialised(streamed: tuple[Path, list[frozenset[int]], Any]) -> None:
    """Fails if the compile ever held more than two decoder layers' experts at once (or never any)."""
    _, seen, report = streamed
    assert seen and max(len(s) for s in seen) <= 2, max(seen, key=len)
    assert set().union(*seen) == set(range(LAYERS))  # every layer was materialised at some point
    assert report.peak_live_layers <= 2


def test_reader_refuses_a_third_layer(ckpt: Path) -> None:
    reader = LazyCheckpoint(ckpt, max_layers=2)
    reader.acquire(0)
    reader.acquire(1)
    with pytest.raises(LayerBudgetError):
        reader.acquire(2)
    reader.release(0)
    assert reader.read("model.norm.weight").dtype == torch.bfloat16  # read in the stored dtype


def test_resume_after_kill(ckpt: Path, tmp_path: Path, streamed: tuple[Path, list[frozenset[int]], Any],
                           monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Stopped after layer 1 (as a kill would), then the same command: layers 0-1 are resumed, not
    recomputed, and the artifact's bytes equal those of an uninterrupted run."""
    work, out = tmp_path / "work", tmp_path / "art"
    monkeypatch.setenv(FAIL_ENV, "1")
    with pytest.raises(InjectedFailure):
        stream_compile(ckpt, pipeline(_calib(ckpt)), out, work_dir=work)
    assert not out.exists() and not list(tmp_path.glob(".art.tmp-*"))
    assert sorted(p.name for p in work.glob("layer-*.json")) == ["layer-00000.json", "layer-00001.json"]
    monkeypatch.delenv(FAIL_ENV)
    report = stream_compile(ckpt, pipeline(_calib(ckpt)), out, work_dir=work)
    assert report.resumed_layers == 2 and [r["layer"] for r in report.layers] == [2]
    assert _hashes(out) == _hashes(streamed[0])
    # the same work folder, another pipeline: refused before anything is written
    code, _, err = _cli(capsys, ckpt, tmp_path / "other", "--work-dir", str(work), keep=0.75)
    one_line_exit_2(code, err, "made by another job", "pipeline")
    assert not (tmp_path / "other").exists()


def _cli(capsys: pytest.CaptureFixture[str], ckpt: Path, out: Path, *extra: str, keep: float = 0.5,
         passes: str | None = None) -> tuple[int, str, str]:
    text = passes if passes is not None else pipeline(CALIB["path"], keep)
    return run_cli("convert", str(ckpt), "--passes", text, "-o", str(out), "--stream", *extra, capsys=capsys)


def _nothing_written(out: Path) -> None:
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*")), list(out.parent.iterdir())


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_bad_shard(ckpt: Path, tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    shard = sorted(bad.glob("*.safetensors"))[1]
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    else:
        shard.unlink()
    out = tmp_path / "out"
    code, _, err = _cli(capsys, bad, out)
    one_line_exit_2(code, err, shard.name, damage)
    _nothing_written(out)


def test_work_dir_of_another_model(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other-model"
    shutil.copytree(ckpt, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-6
    (other / "config.json").write_text(json.dumps(cfg))
    work = tmp_path / "work"
    work.mkdir()
    (work / "job.json").write_text(json.dumps({"format": "moeopt-stream-work", "version": 1, "source": str(ckpt),
                                               "config_sha256": "", "shards": [], "pipeline": "",
                                               "calibration_sha256": ""}))
    out = tmp_path / "out"
    code, _, err = _cli(capsys, other, out, "--work-dir", str(work))
    one_line_exit_2(code, err, "made by another job", "source checkpoint")
    _nothing_written(out)
    (work / "job.json").unlink()
    (work / "stray").write_text("x")
    code, _, err = _cli(capsys, other, out, "--work-dir", str(work))
    one_line_exit_2(code, err, "not a streamed compile's work folder")
    _nothing_written(out)


@pytest.mark.parametrize(("passes", "fragment"), [
    ("importance{calib=C},prune{keep=0.5,cold=0.25},merge,lower{experts=offload,hot=0}",
     "merge needs the pairs of `match`"),
    ("importance{calib=C},prune{keep=0.5,cold=0.25},match,merge{weight=loss},lower{experts=offload,hot=0}",
     "merge{weight=loss} cannot stream"),
    ("importance{calib=C},sensitivity,lower{experts=offload,hot=0}", "pass 'sensitivity' cannot stream"),
    ("quantize{avg-bits=3},lower{experts=offload,hot=0}", "quantize{method=ilp} cannot stream"),
    ("quantize{method=uniform,bits=4,non-experts=auto},lower{experts=offload,hot=0}",
     "quantize{non-experts=auto} cannot stream: auto chooses each linear's width by whole-model sensitivities"),
    ("quantize{method=uniform,bits=4,pin=0:*@8},lower{experts=offload,hot=0}", "quantize{pin=0:*@8} cannot stream"),
    ("quantize{method=uniform,bits=4,scale-dtype=float16},lower{experts=offload,hot=0}",
     "quantize{scale-dtype=float16} cannot stream: the streamed compile's expert records hold float32 scales"),
    ("quantize{method=uniform,bits=4,lm-head=true},lower{experts=offload,hot=0}", "lm-head=true needs non-experts"),
    ("lower{experts=resident}", "experts=resident"),
    ("quantize{method=uniform,bits=4}", "end the pipeline with lower"),
])
def test_pipeline_that_cannot_stream(ckpt: Path, tmp_path: Path, passes: str, fragment: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code, _, err = _cli(capsys, ckpt, out, passes=passes.replace("calib=C", f"calib={_calib(ckpt)}"))
    one_line_exit_2(code, err, fragment)
    _nothing_written(out)


def test_resume_without_inputs_starts_over(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run killed during the export has appended (deleted) some layer files; the inputs of the first
    missing layer are gone too, so the next run recomputes from layer 0, to the same layer results.
    (Stopped after the last layer each time: no export, a few seconds.)"""
    work = tmp_path / "work"
    monkeypatch.setenv(FAIL_ENV, str(LAYERS - 1))
    with pytest.raises(InjectedFailure):
        stream_compile(ckpt, pipeline(_calib(ckpt)), tmp_path / "art", work_dir=work)
    first = {p.name: json.loads(p.read_text())["groups"] for p in work.glob("layer-*.json")}
    (work / "layer-00001.bin").unlink()  # as the expert-file assembly does
    assert not (work / "hidden-00000.pt").exists()
    seen: list[frozenset[int]] = []
    with pytest.raises(InjectedFailure):
        stream_compile(ckpt, pipeline(_calib(ckpt)), tmp_path / "art", work_dir=work, hooks=[seen.append])
    assert set().union(*seen) == set(range(LAYERS))  # layer 0 recomputed, not resumed
    again = {p.name: json.loads(p.read_text())["groups"] for p in work.glob("layer-*.json")}
    assert again == first and len(first) == LAYERS
    assert (work / "layer-00001.bin").exists() and not (tmp_path / "art").exists()


@pytest.mark.parametrize("limit", [20_000, 200_000])
def test_disk_that_fills(ckpt: Path, tmp_path: Path, limit: int, capsys: pytest.CaptureFixture[str]) -> None:
    """A write that fails mid-run (here the file-size limit, RLIMIT_FSIZE, as a disk that fills: the kernel
    answers EFBIG instead of ENOSPC) is one error line, exit 2, and nothing in -o; the limits stop the run in
    the layer sweep (20 kB: torch.save of the hidden states, which raised a bare RuntimeError before) and in
    the export (200 kB)."""
    import resource
    import signal

    out = tmp_path / "out"
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old[1]))
        code, _, err = _cli(capsys, ckpt, out, passes=pipeline(CALIB["path"]).replace("hot=0}", "hot=0,verify=false}"))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, handler)
    errors = [line for line in err.strip().splitlines() if line.startswith("moeopt: error: ")]
    assert code == 2 and len(errors) == 1 and "could not write" in errors[0], err  # progress lines may precede it
    assert err.strip().splitlines()[-1] == errors[0] and "Traceback" not in err, err
    _nothing_written(out)
