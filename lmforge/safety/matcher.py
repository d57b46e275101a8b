"""Finding lexicon terms in text through the obfuscation fold (normalize.py).

Each term becomes a pattern over the folded view: letter by letter, with up to 3 separator
characters (spaces, punctuation, underscores) allowed between letters of a word (`k.i.l.l`,
`k i l l`), a letter repeated up to twice across separators (`ki-l-l`), and up to 6 separators (or none:
`killyourself`) between the words of a phrase; whole words only (no letter or digit just before
or after; scripts written without spaces, such as Chinese, match anywhere). All terms are one
compiled pattern (the `regex` package, leftmost-longest (POSIX) matching; its partial matches tell
the streaming gate what may still become a term); categories are its named groups. Each term's
own pattern is kept too: at a complete match the streaming gate asks whether a longer term could
still match from the same place (`could_grow`).

A `Hit` names the category and the original characters' span, never the term.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from lmforge.safety.filter_config import FilterConfig
from lmforge.safety.normalize import Folded, fold, fold_term

__all__ = ["Hit", "TermMatcher"]

_IN_WORD_GAP = r"[\W_]{0,3}"
_REPEAT_GAP = r"[\W_]{1,3}"
_WORD_GAP = r"[\W_]{0,6}"
_NO_WORD_BEFORE = r"(?<![^\W_])"
_NO_WORD_AFTER = r"(?![^\W_])"


def _regex() -> Any:
    try:
        import regex
    except ModuleNotFoundError:
        from lmforge.safety.errors import SafetyError

        raise SafetyError("the safety filter needs the regex package: pip install -e '.[safety]'") from None
    return regex


def spaced_script(ch: str) -> bool:
    """Whether words of `ch`'s script are separated by spaces (then a term must be a whole word)."""
    if ch.isascii():
        return True
    name = unicodedata.name(ch, "")
    return not name.startswith(("CJK", "HIRAGANA", "KATAKANA", "HANGUL", "THAI", "LAO", "KHMER", "MYANMAR"))


def term_pattern(term: str) -> str:
    """The regular expression (for the `regex` package) of one term over folded text; "" if it folds to nothing."""
    regex = _regex()
    view = fold_term(term)
    words = [w for w in view.split(" ") if w]
    if not words:
        return ""
    parts = []
    for word in words:
        letters = [regex.escape(c) + f"(?:{_REPEAT_GAP}{regex.escape(c)}){{0,2}}" for c in word]
        parts.append(_IN_WORD_GAP.join(letters))
    body = _WORD_GAP.join(parts)
    before = _NO_WORD_BEFORE if spaced_script(words[0][0]) else ""
    after = _NO_WORD_AFTER if spaced_script(words[-1][-1]) else ""
    return before + "(?:" + body + ")" + after


@dataclass(frozen=True)
class Hit:
    """One blocked span of the original text: [start, end) and its category."""

    category: str
    start: int
    end: int


class TermMatcher:
    """Every category's terms as one pattern; `hits(text)` the non-overlapping matches, leftmost first."""

    def __init__(self, config: FilterConfig):
        regex = _regex()
        self.config = config
        self.categories = [c.name for c in config.categories]
        groups = []
        every: set[str] = set()
        for i, cat in enumerate(config.categories):
            pats = sorted({p for p in (term_pattern(t) for t in cat.terms) if p}, key=lambda p: (-len(p), p))
            every.update(pats)
            if pats:
                groups.append(f"(?P<c{i}>" + "|".join(pats) + ")")
        self.pattern = regex.compile("|".join(groups) if groups else r"(?!)", regex.V0 | regex.POSIX)
        self._terms = [regex.compile(p, regex.V0) for p in sorted(every)]

    def category_of(self, match: Any) -> str:
        return self.categories[int(match.lastgroup[1:])]

    def search(self, folded: Folded, pos: int, partial: bool) -> Any:
        return self.pattern.search(folded.text, pos, partial=partial)

    def could_grow(self, folded: Folded, start: int) -> bool:
        """Whether some term matches from `start` up to the end of the view and could go on."""
        for term in self._terms:
            m = term.match(folded.text, start, partial=True)
            if m is not None and (m.partial or m.end() == len(folded.text)):
                return True
        return False

    def iter_hits(self, text: str) -> Iterator[Hit]:
        folded = fold(text)
        for m in self.pattern.finditer(folded.text):
            if m.end() > m.start():
                a, b = folded.original_span(m.start(), m.end())
                yield Hit(self.category_of(m), a, b)

    def hits(self, text: str) -> list[Hit]:
        return list(self.iter_hits(text))
