"""Shingle-hash sets of many texts at once, for near-dedup (near_dedup.py).

A text's shingles are its word n-grams (words: runs of `\\w` characters of the lower-cased text,
exactly what `re.findall(r"\\w+", text.lower())` returns) or character n-grams (of the lower-cased
text with whitespace runs collapsed to one space). Each shingle becomes one stable 64-bit hash
(never Python's salted `hash()`), and a text's set is the sorted unique array of them.

Why numpy over a whole batch of texts instead of a regex and a dict per text: per-text Python
work (the regex scan, one dict lookup per word, one small `np.unique`) was ~60% of near-dedup's
time. Here a batch is one string; word characters are found with a lookup table indexed by code
point, each word is hashed as a polynomial of its code points (one multiply-add pass over the
characters, summed per word), the n-gram windows of all texts are combined in n passes, and
only the per-text sort of the shingle hashes stays a (cheap, C-speed) call per text.
"""

from __future__ import annotations

import functools
import re

import numpy as np

_FNV = np.uint64(0x100000001B3)
_POLY = np.uint64(0x9E3779B97F4A7C15)  # odd: P^k never collapses to 0 mod 2^64
_LEN = np.uint64(0xD6E8FEB86659FD93)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """Bijective 64-bit mixer (wrapping uint64 arithmetic is intended)."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@functools.cache
def _bmp_word_chars() -> np.ndarray:
    """Per code point below 0x10000: does `re`'s `\\w` match it (str.isalnum() or "_")? Built
    once per process from `re` itself (~10 ms), so it agrees with `findall(r"\\w+")` by design."""
    table = np.zeros(0x10000, dtype=bool)
    chars = "".join(map(chr, range(0x10000)))
    table[[m.start() for m in re.finditer(r"\w", chars)]] = True
    table.flags.writeable = False
    return table


def _is_word_char(cp: np.ndarray) -> np.ndarray:
    isw = _bmp_word_chars()[np.minimum(cp, 0xFFFF)]
    big = cp > 0xFFFF
    if big.any():  # astral code points (rare): ask `re` about each distinct one
        codes = np.unique(cp[big])
        ok = np.array([re.match(r"\w", chr(c)) is not None for c in codes.tolist()])
        isw[big] = ok[np.searchsorted(codes, cp[big])]
    return isw


def _code_points(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """All texts joined by one space, as code points; and each text's first position."""
    joined = " ".join(texts)
    cp = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    lens = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts)) + 1
    return cp, np.cumsum(lens) - lens


def _word_units(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """One 64-bit hash per word of every text, in order; and the number of words of each text.
    A word's hash is splitmix64(sum_j c_j * P^j + len * L) over its code points c_j."""
    cp, starts = _code_points([t.lower() for t in texts])
    pos = np.flatnonzero(_is_word_char(cp))
    if not len(pos):
        return np.zeros(0, dtype=np.uint64), np.zeros(len(texts), dtype=np.int64)
    first = np.ones(len(pos), dtype=bool)
    first[1:] = pos[1:] != pos[:-1] + 1
    wstart = np.flatnonzero(first)  # index (into pos) of each word's first character
    lengths = np.diff(np.append(wstart, len(pos)))
    offset = np.arange(len(pos)) - np.repeat(wstart, lengths)
    powers = np.full(int(lengths.max()), _POLY, dtype=np.uint64)
    powers[0] = 1
    powers = np.multiply.accumulate(powers)  # P^0, P^1, ... (wrapping)
    terms = cp[pos].astype(np.uint64) * powers[offset]
    units = splitmix64(np.add.reduceat(terms, wstart) + lengths.astype(np.uint64) * _LEN)
    owner = np.searchsorted(starts, pos[wstart], side="right") - 1
    return units, np.bincount(owner, minlength=len(texts))


def _char_units(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """One 64-bit hash per character (splitmix64 of the code point) of every text."""
    norm = [" ".join(t.lower().split()) for t in texts]
    cp, starts = _code_points(norm)
    keep = np.ones(len(cp), dtype=bool)
    keep[starts[1:] - 1] = False  # the joining spaces
    counts = np.fromiter(map(len, norm), dtype=np.int64, count=len(norm))
    return splitmix64(cp[keep].astype(np.uint64)), counts


def combine(units: np.ndarray, n: int) -> np.ndarray:
    """Hash every window of n consecutive unit hashes into one 64-bit value (order-sensitive).
    A sequence of at most n units is one window (a text shorter than one shingle is one shingle)."""
    if len(units) <= n:
        windows, n = 1, len(units)
    else:
        windows = len(units) - n + 1
    h = np.zeros(windows, dtype=np.uint64)
    for j in range(n):
        h = h * _FNV + units[j:j + windows]
    return splitmix64(h ^ np.uint64(n))


def shingle_hash_sets(texts: list[str], shingle: str = "word", n: int = 5) -> list[np.ndarray]:
    """For each text, the sorted unique uint64 hashes of its shingles (`shingle` "word" or "char",
    n-grams of size n): the sets near-dedup verification compares. Stable across processes and
    machines. Empty texts (no word / character) give an empty array."""
    units, counts = (_word_units if shingle == "word" else _char_units)(texts)
    out = [np.zeros(0, dtype=np.uint64)] * len(texts)
    ends = np.cumsum(counts)
    begins = ends - counts
    with np.errstate(over="ignore"):
        for k in np.flatnonzero((counts > 0) & (counts <= n)).tolist():
            out[k] = combine(units[begins[k]:ends[k]], n)
        long = np.flatnonzero(counts > n)
        if not len(long):
            return out
        h = combine(units, n)  # every window of the batch; those crossing two texts are dropped
    nwin = counts[long] - n + 1
    idx = np.repeat(begins[long] - np.cumsum(nwin) + nwin, nwin) + np.arange(int(nwin.sum()))
    h = h[idx]
    seg = np.append(0, np.cumsum(nwin))
    for s, e in zip(seg[:-1].tolist(), seg[1:].tolist()):
        h[s:e].sort()  # in place, per text
    keep = np.ones(len(h), dtype=bool)
    keep[1:] = h[1:] != h[:-1]
    keep[seg[:-1]] = True  # a text's first shingle is always new
    kept = np.cumsum(keep)
    bounds = np.append(0, kept[seg[1:] - 1])
    h = h[keep]
    for k, s, e in zip(long.tolist(), bounds[:-1].tolist(), bounds[1:].tolist()):
        out[k] = h[s:e]
    return out
