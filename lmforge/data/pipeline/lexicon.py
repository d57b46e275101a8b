"""`lexicon`: drops documents with too many matches of configured terms (a harmful-content list).

    [[steps]]
    type = "lexicon"
    lexicons = ["lists/slurs.txt"]   # files: one term or phrase a line, `#` starts a comment;
                                     # relative to the TOML
    terms = ["some phrase"]          # and/or inline terms
    max_hits = 2                     # drop when more than this many matches
    max_hit_ratio = 0.01             # and/or when matches per word exceed this

Matching: case-insensitive, whole words only (a term never matches inside a longer word: "ass"
does not match "class"), a phrase's spaces match any run of whitespace, and overlapping terms
count once (the longest at each place). Scripts written without spaces between words (Chinese,
Japanese, Korean, Thai, ...: the safety filter's rule, safety/matcher.py `spaced_script`) have no
word edges to find, so a term starting or ending in such a letter matches anywhere on that side
("坏人" in "他是坏人。"); the whole-word rule applied to them found no match in such text at all.
A hit ratio is per word as data/words.py counts words (one per Han or kana character). All terms
are compiled into one regular expression shaped as a trie of their characters, so a document is
scanned once whatever the number of terms (a flat alternation of thousands of terms would try
each of them at every position). Every verdict's score is the number of matches; its detail gives
the matches per word and the first few matched terms with their counts. No word list ships with
lmforge: bring your own.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from lmforge.config.loader import ConfigError
from lmforge.data.pipeline.base import DropSink, Step
from lmforge.data.pipeline.document import Document
from lmforge.data.words import words
from lmforge.safety.matcher import spaced_script

__all__ = ["LexiconConfig", "LexiconStep", "compile_terms", "read_lexicon"]

SHOWN = 5  # matched terms named in a verdict


@dataclass(frozen=True)
class LexiconConfig:
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("lexicons",)  # relative to the TOML (config.py)
    lexicons: list[str] = field(default_factory=list)
    terms: list[str] = field(default_factory=list)
    max_hits: int | None = None
    max_hit_ratio: float | None = None

    def validate(self, prefix: str, where: str | None) -> None:
        for path in self.lexicons:
            if not Path(path).is_file():
                raise ConfigError(prefix + "lexicons", path, "is not a file", where)
        if self.max_hits is None and self.max_hit_ratio is None:
            raise ConfigError(prefix + "max_hits", None, "set max_hits and/or max_hit_ratio", where)
        if self.max_hits is not None and self.max_hits < 0:
            raise ConfigError(prefix + "max_hits", self.max_hits, "must be >= 0", where)
        if self.max_hit_ratio is not None and self.max_hit_ratio < 0:
            raise ConfigError(prefix + "max_hit_ratio", self.max_hit_ratio, "must be >= 0", where)
        if not self.all_terms():
            raise ConfigError(prefix + "terms", self.terms, "no terms: give lexicons files with terms and/or terms",
                              where)


    def all_terms(self) -> list[str]:
        """Every term, normalised (lower case, single spaces), sorted, without repeats."""
        raw = [t for p in self.lexicons for t in read_lexicon(Path(p))] + list(self.terms)
        return sorted({" ".join(t.lower().split()) for t in raw} - {""})


def read_lexicon(path: Path) -> list[str]:
    """A lexicon file's terms: one a line; blank lines and `#` comments (whole line or trailing) skipped."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            term = line.split("#", 1)[0].strip()
            if term:
                out.append(term)
    return out


def _trie_pattern(terms: list[str]) -> str:
    trie: dict = {}
    for t in terms:
        node = trie
        for ch in t:
            node = node.setdefault(ch, {})
        node[""] = {}

    def emit(node: dict) -> str:
        end = "" in node
        branches = [(r"\s+" if ch == " " else re.escape(ch)) + emit(child)
                    for ch, child in sorted(node.items()) if ch != ""]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return "(?:" + body + ")?" if end else body  # end: the longer term first, else this one

    return emit(trie)


@functools.cache
def _unspaced_letters() -> str:
    """A character class of the letters of scripts written without spaces (BMP and the CJK
    extension planes), built once per process from `spaced_script` (0.07 s here)."""
    codes = [cp for lo, hi in ((0x80, 0xFFFF), (0x20000, 0x323AF)) for cp in range(lo, hi + 1)
             if not spaced_script(chr(cp))]
    runs, start = [], codes[0]
    for prev, cp in zip(codes, codes[1:] + [-1]):
        if cp != prev + 1:
            runs.append(f"{re.escape(chr(start))}-{re.escape(chr(prev))}")
            start = cp
    return "[" + "".join(runs) + "]"


def compile_terms(terms: list[str]) -> re.Pattern[str]:
    """One case-insensitive pattern matching any term as whole words (no word character just
    before or after the match), except on a side that is a letter of an unspaced script. Terms are
    split by their first letter's script: a place in the text can start terms of one group only,
    so the longest term at each place still wins. Over the default corpus a lexicon of spaced
    terms scans as fast as the whole-word pattern alone, one that mixes both kinds 1.3x slower
    (a script test at every position was 3x slower)."""
    spaced = [t for t in terms if spaced_script(t[0])]
    unspaced = [t for t in terms if not spaced_script(t[0])]
    starts = ([r"(?<!\w)(?:" + _trie_pattern(spaced) + ")"] if spaced else []) + \
        (["(?:" + _trie_pattern(unspaced) + ")"] if unspaced else [])
    end = rf"(?:(?!\w)|(?<={_unspaced_letters()}))"  # tried only after a term matched
    return re.compile("(?:" + "|".join(starts) + ")" + end, re.IGNORECASE)


@functools.lru_cache(maxsize=1)
def _compiled(terms: tuple[str, ...]) -> re.Pattern[str]:
    """The compiled lexicon, once per process while the terms are unchanged (steps are built per shard)."""
    return compile_terms(list(terms))


class LexiconStep(Step):
    name = "lexicon"

    def __init__(self, config: LexiconConfig, drop: DropSink):
        super().__init__(config, drop)
        self._pattern = _compiled(tuple(config.all_terms()))

    def process(self, doc: Document) -> bool:
        c: LexiconConfig = self.config
        found = Counter(" ".join(m.group(0).lower().split()) for m in self._pattern.finditer(doc.text))
        hits = sum(found.values())
        ratio = hits / max(len(words(doc.text)), 1)
        shown = ", ".join(f"{t!r} x{n}" for t, n in list(found.items())[:SHOWN])
        more = f" (+{len(found) - SHOWN} more terms)" if len(found) > SHOWN else ""
        detail = f"{hits} hits, {ratio:.4g} per word" + (f": {shown}{more}" if hits else "")
        if c.max_hits is not None and hits > c.max_hits:
            return self.reject(doc, "max_hits", float(hits), f"{detail} > max_hits {c.max_hits}")
        if c.max_hit_ratio is not None and ratio > c.max_hit_ratio:
            return self.reject(doc, "max_hit_ratio", float(hits), f"{detail} > max_hit_ratio {c.max_hit_ratio}")
        return self.keep(doc, float(hits), detail)
