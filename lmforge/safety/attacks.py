"""Crafted prompts for measuring the adversarial detector (red-team sets): a benign prompt disguised
by character perturbations, invisible characters, a GCG-style suffix of random tokens, or a mix.

GCG (Zou et al. 2023) appends a suffix optimised token by token; without the target model's
gradients, a suffix of uniformly random vocabulary tokens is the standard stand-in: it has the
same character (unrelated subword pieces, no grammar). Seeded: the same rng gives the same set.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

__all__ = ["ATTACK_KINDS", "auroc", "gcg_suffix", "insert_invisible", "make_attack", "perturb_characters"]

ATTACK_KINDS = ("perturb", "invisible", "suffix", "mixed")
_HOMOGLYPHS = {"a": "\u0430", "e": "\u0435", "o": "\u043e", "p": "\u0440", "c": "\u0441", "x": "\u0445",
               "y": "\u0443", "i": "\u0456", "s": "\u0455", "A": "\u0391", "B": "\u0392", "E": "\u0395",
               "H": "\u0397", "K": "\u039a", "O": "\u039f", "T": "\u03a4"}
_LEET = {"a": "4", "e": "3", "i": "1", "o": "0", "s": "$", "t": "7"}
_INVISIBLE = ("\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad", "\u202e", "\U000e0041")
_MARKS = ("\u0301", "\u0336", "\u0337", "\u0323", "\u0308")


def _disguise(word: str, rng: random.Random, how: str | None = None) -> str:
    """`word` disguised one way; a way that changes nothing (no look-alike or leet letter, a
    caseless script) falls back to combining marks, so every attack differs from its source."""
    how = how or rng.choice(("homoglyph", "leet", "case", "marks"))
    chars = list(word)
    idx = [i for i, c in enumerate(chars) if c.isalpha()]
    if not idx:
        return word
    if how == "homoglyph":
        cands = [i for i in idx if chars[i] in _HOMOGLYPHS] or idx[:1]
        for i in rng.sample(cands, max(1, len(cands) // 2)):
            chars[i] = _HOMOGLYPHS.get(chars[i], chars[i])
    elif how == "leet":
        inner = [i for i in idx[1:-1] if chars[i].lower() in _LEET]
        for i in rng.sample(inner, max(1, len(inner) // 2)) if inner else []:
            chars[i] = _LEET[chars[i].lower()]
    elif how == "case":
        chars = [c.upper() if k % 2 else c.lower() for k, c in enumerate(chars)]
    else:
        for i in rng.sample(idx, max(1, len(idx) // 2)):
            chars[i] += "".join(rng.choice(_MARKS) for _ in range(rng.randint(1, 3)))
    out = "".join(chars)
    return _disguise(word, rng, "marks") if out == word else out


def perturb_characters(text: str, rng: random.Random, rate: float = 0.2) -> str:
    """Disguise a fraction `rate` of the words (at least two): homoglyphs, leetspeak, case flips, marks."""
    words = text.split(" ")
    long_words = [i for i, w in enumerate(words) if sum(c.isalpha() for c in w) >= 4]
    if not long_words:
        return text
    for i in rng.sample(long_words, min(len(long_words), max(2, round(rate * len(words))))):
        words[i] = _disguise(words[i], rng)
    return " ".join(words)


def insert_invisible(text: str, rng: random.Random, count: int | None = None) -> str:
    chars = list(text)
    for _ in range(count or rng.randint(1, 6)):
        chars.insert(rng.randrange(len(chars) + 1), rng.choice(_INVISIBLE))
    return "".join(chars)


def gcg_suffix(decode: Callable[[list[int]], str], vocab_size: int, rng: random.Random, tokens: int = 20,
               skip_ids: Sequence[int] = ()) -> str:
    skip = set(skip_ids)
    ids = []
    while len(ids) < tokens:
        t = rng.randrange(vocab_size)
        if t not in skip:
            ids.append(t)
    return decode(ids)


def make_attack(kind: str, text: str, rng: random.Random, suffix: Callable[[random.Random], str]) -> str:
    """One crafted prompt of `kind` from a benign `text` (for "suffix"/"mixed", `suffix(rng)` is appended)."""
    if kind == "perturb":
        return perturb_characters(text, rng)
    if kind == "invisible":
        return insert_invisible(text, rng)
    if kind == "suffix":
        return text + " " + suffix(rng)
    if kind == "mixed":
        return insert_invisible(perturb_characters(text, rng, 0.1), rng, 1) + " " + suffix(rng)
    raise ValueError(f"attack kind {kind!r}: one of {', '.join(ATTACK_KINDS)}")


def auroc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counting half."""
    if not positive or not negative:
        raise ValueError("auroc needs positive and negative scores")
    pairs = sorted([(s, 1) for s in positive] + [(s, 0) for s in negative])
    rank_sum, i = 0.0, 0
    while i < len(pairs):
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            j += 1
        mid = (i + j + 1) / 2  # average 1-based rank of the tied run
        rank_sum += mid * sum(p[1] for p in pairs[i:j])
        i = j
    n_pos, n_neg = len(positive), len(negative)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
