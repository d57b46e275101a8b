"""A matching view of text that folds the usual obfuscations, with a map back to the original.

Both the lexicon terms and the text go through the same fold (a skeleton, as Unicode TR39's
confusable skeletons), so a term matches however it was disguised:

- compatibility forms (NFKD: fullwidth, mathematical alphanumerics, ligatures) and accents or
  stacked combining marks ("zalgo") dropped: `ｋ𝐢ĺl̷` -> `kill`;
- invisible characters removed: format characters (category Cf: zero-width space/joiners, word
  joiner, soft hyphen, BOM, bidi controls, tags), variation selectors and blank-looking fillers;
- homoglyphs: a non-ASCII letter that Unicode's confusables.txt lists as looking like an ASCII
  letter or digit is that letter (Cyrillic `а`, Greek `ο`, ...): the table of the maintained
  `confusable_homoglyphs` package (its confusables.json, generated from Unicode's data);
- case folded; leetspeak folded: digits inside a word that has letters (`k1ll`, `h4te`) and the
  symbols `@ $ ! | + €` before a letter of their word (`$hoot`, `k!ll`, not the `!` of `kill!`);
  `l`, `1`, `|`, `!` all become `i` (they stand for each other in leetspeak);
- runs of one repeated character collapsed to one (`kiiiill` -> `ki`), so stretching a word does
  not hide it and the matcher's patterns need no unbounded repeats.

`fold(text)` returns the view and, for each view character, the [start, end) span of original
characters it stands for, so a match in the view masks exactly the original characters.
"""

from __future__ import annotations

import functools
import json
import unicodedata
from dataclasses import dataclass
from importlib import resources

__all__ = ["Folded", "fold", "fold_term", "homoglyph_table"]

INVISIBLE_EXTRA = frozenset("\u115f\u1160\u3164\uffa0\u2800\u034f\u180e")  # fillers, CGJ, Mongolian VS
_LEET_DIGITS = {"0": "o", "1": "i", "2": "z", "3": "e", "4": "a", "5": "s", "6": "g", "7": "t", "8": "b", "9": "g"}
_LEET_SYMBOLS = {"@": "a", "$": "s", "!": "i", "|": "i", "+": "t", "€": "e"}
_LETTER_FOLD = {"l": "i"}  # l / 1 / | / ! / i are one letter in leetspeak


@functools.cache
def homoglyph_table() -> dict[str, str]:
    """Non-ASCII character -> the ASCII letter or digit Unicode lists it as confusable with
    (lower case); read once from confusable_homoglyphs' data file (read-only afterwards)."""
    try:
        data = json.loads(resources.files("confusable_homoglyphs").joinpath("confusables.json").read_text("utf-8"))
    except ModuleNotFoundError:
        from lmforge.safety.errors import SafetyError

        raise SafetyError("the safety filter needs the confusable-homoglyphs package: pip install -e "
                          "'.[safety]'") from None
    table: dict[str, str] = {}
    for char, homoglyphs in data.items():
        if len(char) != 1 or char.isascii():
            continue
        ascii_like = sorted((h["c"].lower() for h in homoglyphs if len(h["c"]) == 1 and h["c"].isascii()
                             and h["c"].isalnum()), key=lambda c: (c.isdigit(), c))  # letters first
        if ascii_like:
            table[char] = ascii_like[0]
    return table


def _is_invisible(ch: str) -> bool:
    cat = unicodedata.category(ch)
    return cat in ("Cf", "Mn", "Me") or ch in INVISIBLE_EXTRA


@functools.lru_cache(maxsize=65536)
def _base(ch: str) -> str:
    """One character's letters after NFKD, marks and invisibles dropped, homoglyphs mapped, casefolded."""
    if ch.isascii():
        return ch.lower()
    table = homoglyph_table()
    out = []
    for c in unicodedata.normalize("NFKD", ch):
        if _is_invisible(c):
            continue
        c = table.get(c, c)
        out.append(c.casefold())
    return "".join(out)


@dataclass(frozen=True)
class Folded:
    """The view (`text`) and, per view character, its original span [`starts[i]`, `ends[i]`)."""

    text: str
    starts: list[int]
    ends: list[int]

    def original_span(self, start: int, end: int) -> tuple[int, int]:
        """The original characters [a, b) that view characters [start, end) stand for (end > start)."""
        return self.starts[start], self.ends[end - 1]


def _is_word_char(c: str) -> bool:
    return c.isalnum() or c in _LEET_SYMBOLS


def fold(text: str) -> Folded:
    chars: list[str] = []   # folded pieces (before leet), each with its original index
    index: list[int] = []
    for i, ch in enumerate(text):
        for c in _base(ch):
            chars.append(c)
            index.append(i)
    n = len(chars)
    # leetspeak: decided per run of word characters (letters, digits, leet symbols)
    out_chars = list(chars)
    i = 0
    while i < n:
        if not _is_word_char(chars[i]):
            i += 1
            continue
        j = i
        while j < n and _is_word_char(chars[j]):
            j += 1
        letters_after = [False] * (j - i + 1)
        for k in range(j - 1, i - 1, -1):
            letters_after[k - i] = letters_after[k - i + 1] or chars[k].isalpha()
        has_letter = letters_after[0] or j - i == 1  # a lone digit is a word too: "1 will" = "i will"
        for k in range(i, j):
            c = chars[k]
            if c in _LEET_DIGITS and has_letter:
                out_chars[k] = _LEET_DIGITS[c]
            elif c in _LEET_SYMBOLS and letters_after[k - i + 1]:
                out_chars[k] = _LEET_SYMBOLS[c]
            out_chars[k] = _LETTER_FOLD.get(out_chars[k], out_chars[k])
        i = j
    view: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    for c, orig in zip(out_chars, index, strict=True):
        if view and view[-1] == c:  # a repeated character: one view character for the whole run
            ends[-1] = orig + 1
            continue
        view.append(c)
        starts.append(orig)
        ends.append(orig + 1)
    return Folded("".join(view), starts, ends)


def fold_term(term: str) -> str:
    """A lexicon term's view: the same fold, spaces kept as single word gaps."""
    return " ".join(fold(word).text for word in term.split())
