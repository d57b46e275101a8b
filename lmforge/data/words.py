"""What the data stages count as a word, in any script.

Space-separated scripts: a run of non-space characters (what `str.split()` gives, so the Gopher
quality rules read English exactly as before). Chinese and Japanese are written without spaces:
there `str.split()` makes a whole line one "word" (a 1,600-character news article counted 16), so
each Han ideograph and each kana counts as one word. A Chinese word has about 1.5 characters on
average, so such counts run high by about that factor; a segmenter (a dictionary and a model, such
as snownlp's) would count exactly, at a cost this counter does not pay. Korean Hangul is written with
spaces and stays as runs; Thai, Lao, Khmer and Burmese (no spaces, no one-character words) are not
split and still count a run as a word. The same rule gives the units of `lm_score`'s n-gram model
(`scored_units`), so a Chinese reference trains a model of characters, not one of clauses seen once."""

from __future__ import annotations

import re

__all__ = ["scored_units", "words", "word_tokens"]

# Hiragana and Katakana, CJK Unified Ideographs (extension A and the basic block), compatibility ideographs
_CHARACTER_WORDS = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
# a character word takes the punctuation after it ("国。" as "word," in English); other runs as str.split()
_WORD = re.compile(rf"[{_CHARACTER_WORDS}][^\s\w{_CHARACTER_WORDS}]*|[^\s{_CHARACTER_WORDS}]+")
_TOKEN = re.compile(rf"[{_CHARACTER_WORDS}]|[^\W{_CHARACTER_WORDS}]+")
_SCORED_UNIT = re.compile(rf"[{_CHARACTER_WORDS}]|[^\W{_CHARACTER_WORDS}]+|[^\w\s]")
_ANY_CHARACTER_WORD = re.compile(rf"[{_CHARACTER_WORDS}]")


def words(text: str) -> list[str]:
    """The words of `text` with their punctuation attached (as `str.split()` for spaced scripts)."""
    # str.split() where it gives the same: over the default corpus (9.9M characters) the pattern alone
    # takes 0.24 s, this 0.13 s, str.split() 0.06 s
    return _WORD.findall(text) if _ANY_CHARACTER_WORD.search(text) else text.split()


def word_tokens(text: str) -> list[str]:
    """The lowercased words a unigram distribution counts: runs of letters and digits (punctuation
    and case do not make two words different), one per Han or kana character."""
    return _TOKEN.findall(text.lower())


def scored_units(text: str) -> list[str]:
    """The units a word-level language model predicts: lowercased words (one per Han or kana
    character) and each punctuation mark on its own, so "Hello, 世界。" is hello , 世 界 。"""
    return _SCORED_UNIT.findall(text.lower())
