"""Per-app customisation: proxy extraction, LoRA tuning on the proxy, plugging adapters into the foundation."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import moeopt
from moeopt.demo import DEMO_DATA
from moeopt.passes.calib import load_tokenizer
from moeopt.tune import (
    AdapterSet,
    TuneSettings,
    app_loss,
    build_examples,
    extract,
    finetune,
    fingerprint,
    plug,
    read_rows,
    target_modules,
)
from tests.test_cli import run_cli

FAST = TuneSettings(steps=30, batch_size=8, lr=1e-2, rank=4, alpha=8, warmup=2, save_every=0, max_len=96)
IDS = torch.randint(1, 300, (2, 24), generator=torch.Generator().manual_seed(0))


def _examples(model: moeopt.MoEModel, app: str = "intent", loss: str = "label") -> list[Any]:
    rows, _ = read_rows(f"app:{app}", data_root=DEMO_DATA)
    return build_examples(rows, load_tokenizer(model), loss=loss, max_len=96)  # type: ignore[arg-type]


def _lora(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


@pytest.fixture(scope="module")
def proxy_dir(text_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = moeopt.load(text_ckpt)
    extract(model, "app:intent", keep=0.5, calib_tokens=2048, data_root=DEMO_DATA)
    return model.save(tmp_path_factory.mktemp("proxy") / "intent", dtype=torch.float32)


@pytest.fixture(scope="module")
def tuned(proxy_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    proxy = moeopt.load(proxy_dir)
    examples = _examples(proxy)
    before = app_loss(proxy.hf, examples)
    out = tmp_path_factory.mktemp("adapters") / "intent"
    res = finetune(proxy, examples, FAST, out, progress=False, meta={"app": "app:intent"})
    return {"proxy": proxy, "result": res, "out": out, "before": before, "after": app_loss(res.model, examples)}


def test_proxy_shares_the_non_expert_weights_and_shrinks_the_experts(text_ckpt: Path, proxy_dir: Path) -> None:
    foundation, proxy = moeopt.load(text_ckpt), moeopt.load(proxy_dir)
    assert fingerprint(proxy) == fingerprint(foundation)  # what `plug` relies on
    assert all(layer.table.num_slots == 4 for layer in proxy.layers)  # keep=0.5 of 8 experts
    assert proxy.stats().expert == foundation.stats().expert // 2
    assert "merge" in proxy.history[-1] and "importance{calib=app:intent" in proxy.history[-1]
    assert proxy.history[-1].endswith("canonicalize,refit")  # extract refits by default; the fingerprint holds


def test_targets_are_the_shared_linear_layers(text_ckpt: Path) -> None:
    model = moeopt.load(text_ckpt)
    attn = target_modules(model, "attention")
    assert len(attn) == 8 and all(".self_attn." in n for n in attn)  # 2 layers x q, k, v, o
    assert set(target_modules(model, "non-expert")) == set(attn)  # Mixtral: no dense MLP, head excluded
    assert target_modules(model, "q_proj,v_proj") == [n for n in attn if n.endswith(("q_proj", "v_proj"))]
    with pytest.raises(moeopt.BadInputError, match="routed experts"):
        target_modules(model, "experts")
    with pytest.raises(moeopt.BadInputError, match="no non-expert linear layer named gate"):
        target_modules(model, "gate")


def test_tuning_on_the_proxy_reduces_the_app_loss(tuned: dict[str, Any]) -> None:
    # Measured: 6.05 -> 5.82 nats on the label tokens of the 48 demo examples (30 steps). The random model's
    # small output head caps what attention-only LoRA can move (~0.6 nats of logit range); bound at 2/3 the drop.
    assert tuned["after"] < tuned["before"] - 0.15, (tuned["before"], tuned["after"])
    meta = json.loads((tuned["out"] / "moeopt-adapter.json").read_text())
    assert meta["foundation"]["fingerprint"].startswith("sha256:") and meta["train"]["steps"] == FAST.steps
    assert meta["train"]["peak_rss_mib"] > 0 and len(meta["train"]["losses"]) == FAST.steps


def test_adapter_round_trip_gives_identical_logits(tuned: dict[str, Any], proxy_dir: Path) -> None:
    want = tuned["result"].model(input_ids=IDS, use_cache=False).logits.detach()
    again = plug(moeopt.load(proxy_dir), tuned["out"], merge=False)
    assert torch.equal(again.logits(IDS), want)
    merged = plug(moeopt.load(proxy_dir), tuned["out"])
    assert (merged.logits(IDS) - want).abs().max().item() <= 1e-5
    assert not (moeopt.load(proxy_dir).logits(IDS) - want).abs().max().item() <= 1e-3  # the adapter does act


def test_plugged_foundation_saves_reloads_and_verifies(tuned: dict[str, Any], text_ckpt: Path, tmp_path: Path) -> None:
    model = plug(moeopt.load(text_ckpt), tuned["out"])
    moeopt.verify(model)
    assert "plug{adapter=intent}" in model.history
    assert len(model.layers) == 2 and all(not any("lora" in k for k in m.state_dict()) for m in model.layers)
    again = moeopt.load(model.save(tmp_path / "plugged", dtype=torch.float32))
    assert torch.equal(again.logits(IDS), model.logits(IDS))


def test_foreign_adapter_is_refused(
    tuned: dict[str, Any], text_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = moeopt.load(text_ckpt)
    with torch.no_grad():
        other.hf.get_parameter("model.layers.0.self_attn.q_proj.weight")[0, 0] += 1e-3
    with pytest.raises(moeopt.BadInputError, match="different foundation"):
        plug(other, tuned["out"])
    folder = other.save(tmp_path / "other", dtype=torch.float32)
    code, _, err = run_cli("plug", str(folder), str(tuned["out"]), "-o", str(tmp_path / "x"), capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and "different foundation" in err
    assert not (tmp_path / "x").exists()


def test_resume_continues_exactly(proxy_dir: Path, tmp_path: Path) -> None:
    settings = TuneSettings(steps=6, batch_size=4, lr=1e-2, rank=4, alpha=8, warmup=2, save_every=0, max_len=96,
                            dropout=0.1)
    straight = moeopt.load(proxy_dir)
    examples = _examples(straight)
    want = _lora(finetune(straight, examples, settings, tmp_path / "a", progress=False).model)

    def stop(step: int, loss: float) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(moeopt.load(proxy_dir), examples, settings, tmp_path / "b", progress=False, on_step=stop)
    assert (tmp_path / "b.ckpt" / "state.pt").exists() and not (tmp_path / "b").exists()
    with pytest.raises(moeopt.BadInputError, match="--resume"):
        finetune(moeopt.load(proxy_dir), examples, settings, tmp_path / "b", progress=False)
    res = finetune(moeopt.load(proxy_dir), examples, settings, tmp_path / "b", progress=False, resume=True)
    got = _lora(res.model)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not (tmp_path / "b.ckpt").exists()


def test_several_apps_side_by_side(tuned: dict[str, Any], text_ckpt: Path, tmp_path: Path) -> None:
    foundation = moeopt.load(text_ckpt)
    settings = TuneSettings(steps=4, batch_size=4, rank=4, alpha=8, warmup=1, save_every=0, max_len=96)
    movie = copy.deepcopy(foundation)
    finetune(movie, _examples(movie, "movie-sentiment"), settings, tmp_path / "movie", progress=False)
    base = foundation.logits(IDS)
    apps = AdapterSet(foundation, {"intent": tuned["out"], "movie": tmp_path / "movie"})
    assert apps.names == ["intent", "movie"] and apps.active == "intent"
    for name, folder in (("intent", tuned["out"]), ("movie", tmp_path / "movie")):
        apps.use(name)
        alone = plug(moeopt.load(text_ckpt), folder)
        assert (apps.logits(IDS) - alone.logits(IDS)).abs().max().item() <= 1e-5
        assert (apps.merged(name).logits(IDS) - alone.logits(IDS)).abs().max().item() <= 1e-5
    with apps.foundation():
        assert torch.equal(apps.logits(IDS), base)
    with pytest.raises(moeopt.BadInputError, match="no adapter 'news'"):
        apps.use("news")


def test_cli_extract_finetune_plug(text_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = ["--data", str(DEMO_DATA)]
    proxy, adapter, out = tmp_path / "proxy", tmp_path / "adapter", tmp_path / "plugged"
    code, text, err = run_cli("extract", str(text_ckpt), "--app", "app:tweet-sentiment", "--keep", "0.25",
                              "-o", str(proxy), "--calib-tokens", "1024", *data, capsys=capsys)
    assert code == 0, err
    assert "routed-expert params" in text and moeopt.load(proxy).layers[0].table.num_slots == 2
    assert "sensitivity{calib=app:tweet-sentiment" in text and "prune{keep=0.25,cold=0.375,score=loss}" in text
    code, text, err = run_cli("finetune", str(proxy), "--app", "app:tweet-sentiment", "-o", str(adapter),
                              "--steps", "3", "--batch-size", "4", "--max-len", "64", "--no-progress", *data,
                              capsys=capsys)
    assert code == 0, err
    assert "peak RSS" in text and (adapter / "adapter_config.json").exists()
    code, text, err = run_cli("plug", str(text_ckpt), str(adapter), "-o", str(out), capsys=capsys)
    assert code == 0, err
    assert "plug{adapter=adapter}" in moeopt.load(out).history


@pytest.mark.parametrize(("args", "message"), [
    (("extract", "{ckpt}", "--app", "{tmp}/missing.jsonl", "-o", "{tmp}/p"), "no such app data file"),
    (("extract", "{ckpt}", "--app", "app:intent", "--keep", "0", "-o", "{tmp}/p"), "--keep must be in (0, 1]"),
    (("extract", "{ckpt}", "--app", "app:intent", "--keep", "1.5", "-o", "{tmp}/p"), "--keep must be in (0, 1]"),
    (("extract", "{ckpt}", "--app", "app:chess", "-o", "{tmp}/p"), "unknown app 'chess'"),
    (("extract", "{ckpt}", "--app", "app:intent", "--rank", "norm", "-o", "{tmp}/p"), "--rank must be one of loss"),
    (("finetune", "{ckpt}", "--app", "{tmp}/missing.jsonl", "-o", "{tmp}/a"), "no such app data file"),
    (("finetune", "{ckpt}", "--app", "app:intent", "--steps", "0", "-o", "{tmp}/a"), "--steps must be >= 1"),
    (("finetune", "{ckpt}", "--app", "app:intent", "--targets", "experts", "-o", "{tmp}/a", "--data", "{demo}"),
     "routed experts"),
    (("plug", "{ckpt}", "{tmp}", "-o", "{tmp}/m"), "not a moeopt adapter"),
])
def test_cli_bad_input_exits_2(
    args: tuple[str, ...], message: str, text_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [a.format(ckpt=text_ckpt, tmp=tmp_path, demo=DEMO_DATA) for a in args]
    code, _, err = run_cli(*argv, capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_records_without_a_label_need_loss_all(text_ckpt: Path, tmp_path: Path) -> None:
    model = moeopt.load(text_ckpt)
    path = tmp_path / "plain.jsonl"
    path.write_text(json.dumps({"text": "a plain sentence with no label at all"}) + "\n")
    rows, _ = read_rows(str(path))
    with pytest.raises(moeopt.BadInputError, match="--loss all"):
        build_examples(rows, load_tokenizer(model), loss="label")
    (ex,) = build_examples(rows, load_tokenizer(model), loss="all")
    assert not ex.target[0] and all(ex.target[1:])
    path.write_text(json.dumps({"text": "Play some jazz.", "label": "music"}) + "\n")
    with pytest.raises(moeopt.BadInputError, match="--task"):
        build_examples(read_rows(str(path))[0], load_tokenizer(model))
    assert len(build_examples(read_rows(str(path), task="intent")[0], load_tokenizer(model))) == 1
    # An app record: the loss is on exactly the label tokens that the evaluation scores.
    from moeopt.data.apps import APPS
    from moeopt.eval.classify import label_continuations

    row = read_rows("app:intent", data_root=DEMO_DATA)[0][0]
    _, conts = label_continuations(load_tokenizer(model), APPS["intent"].prompt(row["text"]), APPS["intent"].labels)
    labelled = _examples(model, "intent")[0]
    assert [int(i) for i, t in zip(labelled.ids, labelled.target, strict=True) if t] == conts[
        APPS["intent"].labels.index(row["label"])]
    assert labelled.target[-1] and labelled.ids[0] == 0  # ends with the label, starts with EOS like the eval


def test_held_out_app_examples_take_the_loss_on_its_label(text_ckpt: Path) -> None:
    # A held-out app (not in the reference model's training) resolves by name like the five others.
    from moeopt.data.apps import HELD_OUT_APPS
    from moeopt.eval.classify import label_continuations

    fixtures = Path(__file__).parent / "fixtures" / "data"
    model = moeopt.load(text_ckpt)
    tok = load_tokenizer(model)
    rows, name = read_rows("app:health-source", data_root=fixtures)
    assert name == "health-source" and all(r["app"] == "health-source" for r in rows)
    app = HELD_OUT_APPS["health-source"]
    for row, ex in zip(rows[:5], build_examples(rows[:5], tok), strict=True):
        _, conts = label_continuations(tok, app.prompt(row["text"]), app.labels)
        assert [int(i) for i, t in zip(ex.ids, ex.target, strict=True) if t] == conts[app.labels.index(row["label"])]
