"""Text normalisation shared by every source, and a minimal MediaWiki markup stripper.

The wiki filter is our own small reimplementation of what ``gensim.corpora.wikicorpus.filter_wiki``
does (gensim is LGPL and pulls in scipy/smart_open; we need only the text): it keeps article prose and
drops templates, tables, references, files and categories.
"""

from __future__ import annotations

import html
import re
import unicodedata

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\ufeff\ufffd]")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u3000]+")
_BLANK_LINES = re.compile(r"\n{3,}")
_URL = re.compile(r"https?://\S+|www\.\S+")


def normalise(text: str, *, keep_newlines: bool = True) -> str:
    """NFC-normalise, drop control/replacement characters, collapse spaces, strip each line.

    Args:
        text: Raw text.
        keep_newlines: Keep paragraph breaks (at most one blank line); else fold into spaces.
    """
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _CONTROL.sub("", text)
    if not keep_newlines:
        text = text.replace("\n", " ")
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def strip_urls(text: str) -> str:
    """Remove URLs (tweets carry t.co links whose random suffixes only waste tokens)."""
    return _URL.sub("", text)


_PTB = {"-LRB-": "(", "-RRB-": ")", "-LSB-": "[", "-RSB-": "]", "-LCB-": "{", "-RCB-": "}",
        "-COLON-": ":", "``": '"', "''": '"'}
_PTB_RE = re.compile("|".join(re.escape(k) for k in _PTB))
_SPACE_BEFORE = re.compile(r" ([,.;:!?%)\]}]|'s\b|n't\b|'re\b|'ve\b|'ll\b|'d\b|'m\b)")
_SPACE_AFTER = re.compile(r"([(\[{$]) ")


def detokenise(text: str) -> str:
    """Undo Penn-Treebank tokenisation (VitaminC ships ``-LRB- x -RRB- , y``)."""
    text = _PTB_RE.sub(lambda m: _PTB[m.group(0)], text)
    text = _SPACE_BEFORE.sub(r"\1", text)
    return _SPACE_AFTER.sub(r"\1", text)


# --- MediaWiki ---------------------------------------------------------------------------------
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.DOTALL | re.IGNORECASE)
_DROP_TAGS = re.compile(r"<(math|nowiki|gallery|timeline|score|syntaxhighlight|source)\b.*?</\1>",
                        re.DOTALL | re.IGNORECASE)
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.DOTALL)
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_EXT_LINK = re.compile(r"\[(?:https?|ftp)://[^\s\]]+(?: ([^\]]*))?\]")
_TAG = re.compile(r"<[^<>]*>")
_QUOTES = re.compile(r"'{2,}")
_HEADING = re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.MULTILINE)
_LIST = re.compile(r"^[*#:;]+\s*", re.MULTILINE)
_MAGIC = re.compile(r"__[A-Z]+__")
_DROP_NS = ("file:", "image:", "category:", "media:")
_INTERWIKI = re.compile(r"^[a-z]{2,3}(-[a-z]+)?:")


def _sub_fixpoint(pattern: re.Pattern[str], repl: str, text: str) -> str:
    """Apply ``pattern`` until nothing changes: templates and tables nest."""
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return text
        text = new


def _link_text(match: re.Match[str]) -> str:
    inner = match.group(1)
    target = inner.split("|", 1)[0].strip().lower()
    if target.startswith(_DROP_NS) or _INTERWIKI.match(target):
        return ""
    return inner.rsplit("|", 1)[-1]


def filter_wiki(raw: str) -> str:
    """Plain prose from MediaWiki markup (one paragraph per line, headings kept as lines)."""
    text = _COMMENT.sub("", raw)
    text = _REF.sub("", text)
    text = _DROP_TAGS.sub("", text)
    text = _sub_fixpoint(_TEMPLATE, "", text)
    text = _sub_fixpoint(_TABLE, "", text)
    # Innermost links first, so links inside a file caption resolve before the file link is dropped.
    while True:
        new = _LINK.sub(_link_text, text)
        if new == text:
            break
        text = new
    text = _EXT_LINK.sub(lambda m: m.group(1) or "", text)
    text = html.unescape(text)
    text = _TAG.sub("", text)
    text = _QUOTES.sub("", text)
    text = _MAGIC.sub("", text)
    text = _HEADING.sub(r"\1", text)
    text = _LIST.sub("", text)
    # Leftover table rows or template debris start with these characters.
    lines = [ln for ln in text.split("\n")
             if not ln.lstrip().startswith(("|", "!", "{", "}")) and "|thumb" not in ln]
    return normalise("\n".join(lines))
