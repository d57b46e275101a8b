"""Known near-duplicates planted in a corpus, to measure near-dedup recall and precision.

A near-dedup method can only be scored against pairs whose similarity is known. Here passages are
cut from real text (the embedded Shakespeare + KJV corpus by default), and for some of them an
edited copy is added whose exact Jaccard with its original is computed with plain Python sets of
word n-grams, independently of `near_dedup.py` (which it is used to test). The copies are placed
after all originals, so every "keep the first document of a cluster" method should drop the copy,
not the original: scoring is then the same for every method (which copies were dropped).

Edits are word substitutions (from the passages' own vocabulary) and deletions at random
positions until the copy's Jaccard falls to the target level or just below it; a level below the
dedup threshold gives copies that must NOT be removed (negatives).
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

_WORD = re.compile(r"\w+")
# passage lengths in words, cycled: 100-300 words, ~200 on average
PASSAGE_WORDS = (100, 180, 250, 300, 140, 220)
# target Jaccard of the copies, cycled: three above a 0.8 threshold, one clearly below
LEVELS = (0.95, 0.9, 0.85, 0.68)


def word_shingles(words: Sequence[str], n: int = 5) -> set[tuple[str, ...]]:
    """The reference shingle set: word n-grams of lower-cased words (one n-gram if shorter)."""
    w = [x.lower() for x in words]
    return {tuple(w[i:i + n]) for i in range(max(1, len(w) - n + 1))}


def true_jaccard(x: Sequence[str], y: Sequence[str], n: int = 5) -> float:
    a, b = word_shingles(x, n), word_shingles(y, n)
    return len(a & b) / len(a | b)


def passages(texts: Iterable[str], limit: int | None = None,
             sizes: Sequence[int] = PASSAGE_WORDS) -> list[list[str]]:
    """Consecutive word passages cut from each text (sizes cycled across texts; a text's tail
    shorter than the next size is dropped), at most `limit` in all."""
    out: list[list[str]] = []
    cycle = itertools.cycle(sizes)
    for text in texts:
        words = _WORD.findall(text)
        pos = 0
        while limit is None or len(out) < limit:
            size = next(cycle)
            if pos + size > len(words):
                break
            out.append(words[pos:pos + size])
            pos += size
        if limit is not None and len(out) >= limit:
            break
    return out


def edit_down_to(words: list[str], target: float, rng: random.Random, vocab: Sequence[str],
                 n: int = 5) -> list[str]:
    """Substitute (70%) or delete (30%) random words until the true Jaccard with the original is
    <= target."""
    copy = list(words)
    while true_jaccard(words, copy, n) > target:
        i = rng.randrange(len(copy))
        if rng.random() < 0.7:
            copy[i] = rng.choice(vocab)
        else:
            del copy[i]
    return copy


@dataclass
class InjectedCorpus:
    """docs: (id, text) in stream order (all originals, then the copies in random order); ids sort
    in stream order. truth: copy id -> (original id, exact Jaccard of the copy with it)."""

    docs: list[tuple[str, str]]
    truth: dict[str, tuple[str, float]] = field(default_factory=dict)
    threshold: float = 0.8

    @property
    def positives(self) -> set[str]:
        return {c for c, (_, s) in self.truth.items() if s >= self.threshold}

    @property
    def negatives(self) -> set[str]:
        return {c for c, (_, s) in self.truth.items() if s < self.threshold}

    def score(self, dropped: Iterable[str]) -> dict[str, float]:
        """recall: positives dropped / positives; precision: positives dropped / copies dropped
        (an injected copy's truth is known exactly); other_dropped: originals dropped (passages of
        the corpus itself that a method judged near-duplicates of each other; no truth for those)."""
        dropped = set(dropped)
        pos, neg = self.positives, self.negatives
        hit = len(dropped & pos)
        injected = len(dropped & (pos | neg))
        return {"recall": hit / max(1, len(pos)), "precision": hit / max(1, injected),
                "false_drops": float(len(dropped & neg)), "other_dropped": float(len(dropped - pos - neg))}


def inject(base: list[list[str]], every: int = 4, levels: Sequence[float] = LEVELS, seed: int = 12,
           threshold: float = 0.8, n: int = 5) -> InjectedCorpus:
    """Every `every`-th passage gets one edited copy at the next level of `levels`."""
    rng = random.Random(seed)
    vocab = sorted({w for p in base for w in p})
    width = len(str(len(base)))
    docs = [(f"d{i:0{width}d}", " ".join(p)) for i, p in enumerate(base)]
    copies: list[tuple[str, str]] = []
    truth: dict[str, tuple[str, float]] = {}
    for k, i in enumerate(range(0, len(base), every)):
        target = levels[k % len(levels)]
        copy = edit_down_to(base[i], target, rng, vocab, n)
        cid = f"e{i:0{width}d}~{round(target * 100)}"  # "e" > "d": every copy sorts after every original
        copies.append((cid, " ".join(copy)))
        truth[cid] = (f"d{i:0{width}d}", true_jaccard(base[i], copy, n))
    rng.shuffle(copies)
    return InjectedCorpus(docs + copies, truth, threshold)
