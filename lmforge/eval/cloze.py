"""A cloze task from held-out text: given a few lines of a held-out document, which of k candidate
lines comes next? The true next line is one candidate; the others are lines from other places of
held-out documents of the same domain. Built from text only (no model, no tokenizer), with a fixed
seed, so the same data gives the same items every time; no item uses training text.

Lines ("segments"): the non-blank lines of a document; a line holding several sentences that end in
。！？ (Chinese prose keeps a paragraph per line) is cut after each, closing quotes kept. A leading
number ("3 And Abraham called ...", a verse number) stays in the context, not in the candidate:
otherwise counting would pick the answer. A candidate has 12 to 200 characters.

Distractors: from the same domain's held-out segments, never the true line's context or the true
line itself, never equal to it, a prefix of it or having it as a prefix (a model that knew the text
could not tell those apart), and of a similar length without giving the answer away. Drawn around
the true line's length, distractors would leave it in the middle of the candidates' lengths: total
log-likelihood favours the shortest and would score below chance, "pick the middle one" above it.
So the domain's lines are sorted by length, a window of `window_size` neighbouring ranks that holds
the true line is drawn (its place around the true line uniform), and the distractors are drawn
from the window: the true line's length rank among the candidates is then uniform. The answer's
position among the candidates is drawn too.

Scoring (`score_items`): the model's log-likelihood of each candidate after the context. Two
accuracies: `accuracy` takes the candidate with the highest total log-likelihood (no length
normalisation: favours short lines), `accuracy_norm` the highest mean log-likelihood per candidate
token (length-normalised). Chance is the mean of 1 / candidates over the items; each accuracy comes
with its binomial standard error.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lmforge.eval.scoring import token_nll

SEED = 0
MIN_CHARS, MAX_CHARS = 12, 200
_SENTENCE = re.compile(r"[^。！？]*[。！？]+[”’」』）]*|[^。！？]+")
_LEADING_NUMBER = re.compile(r"\d+\s+")


@dataclass(frozen=True)
class ClozeItem:
    """One question: `context` (the original text before the true line), `choices`, `answer` index."""

    domain: str
    document: int  # index of the document in the held-out split
    segment: int  # index of the true line among the document's segments
    context: str
    choices: tuple[str, ...]
    answer: int


def segments(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the document's lines / sentences (see the module docstring)."""
    spans, pos = [], 0
    for line in text.split("\n"):
        for m in _SENTENCE.finditer(line):
            a, b = m.start(), m.end()
            while a < b and line[a].isspace():
                a += 1
            while b > a and line[b - 1].isspace():
                b -= 1
            if (num := _LEADING_NUMBER.match(line, a)) and num.end() < b:
                a = num.end()
            if a < b:
                spans.append((pos + a, pos + b))
        pos += len(line) + 1
    return spans


def _usable(s: str) -> bool:
    return MIN_CHARS <= len(s) <= MAX_CHARS and any(c.isalpha() for c in s)


def _related(a: str, b: str) -> bool:
    return a == b or a.startswith(b) or b.startswith(a)


def build_items(docs: Sequence[tuple[str, str]], n_items: int, n_choices: int = 4, n_context: int = 3,
                seed: int = SEED) -> list[ClozeItem]:
    """Up to `n_items` items from held-out documents given as (domain, text), taken in turn from
    each domain (names sorted), each domain's candidate lines in a seeded order."""
    if n_items < 1:
        return []
    spans = [segments(text) for _, text in docs]
    pools: dict[str, list[tuple[int, int, str]]] = {}  # domain -> (document, segment, text) of usable lines
    for d, ((domain, text), sp) in enumerate(zip(docs, spans)):
        pools.setdefault(domain, []).extend((d, i, t) for i, (a, b) in enumerate(sp) if _usable(t := text[a:b]))
    names = sorted(pools)
    for name in names:  # by length (then document order): the rank windows of `_item`
        pools[name].sort(key=lambda line: (len(line[2]), line[0], line[1]))
    order = {name: np.random.default_rng([seed, k]).permutation(len(pools[name])) for k, name in enumerate(names)}
    items: list[ClozeItem] = []
    cursor = dict.fromkeys(names, 0)
    while len(items) < n_items and any(cursor[n] < len(order[n]) for n in names):
        for k, name in enumerate(names):
            while cursor[name] < len(order[name]) and len(items) < n_items:
                rank = int(order[name][cursor[name]])
                d, i, _ = pools[name][rank]
                cursor[name] += 1
                if i < n_context:
                    continue
                item = _item(docs, spans, pools[name], rank, n_choices, n_context,
                             np.random.default_rng([seed, k, d, i]))
                if item is not None:
                    items.append(item)
                    break
    return items


_TRIES = 200  # random draws per distractor search (no pass over a large window per item)
_WINDOW_SHARE, _WINDOW_MIN = 0.05, 32  # the length window: 5% of the domain's lines, at least 32


def window_size(pool_size: int) -> int:
    """Lines in the length window distractors are drawn from: narrow enough that candidates have
    similar lengths, wide enough to hold distinct, unrelated lines."""
    return min(pool_size, max(_WINDOW_MIN, round(pool_size * _WINDOW_SHARE)))


def _item(docs: Sequence[tuple[str, str]], spans: list[list[tuple[int, int]]], pool: list[tuple[int, int, str]],
          rank: int, n_choices: int, n_context: int, rng: np.random.Generator) -> ClozeItem | None:
    """The item whose true line is `pool[rank]` (segment i of document d; `pool` sorted by length),
    or None when its length window holds too few distractors for it."""
    d, i, true = pool[rank]
    width = window_size(len(pool))
    first = int(rng.integers(max(0, rank - width + 1), min(rank, len(pool) - width) + 1))
    chosen: list[str] = []
    for j in first + rng.integers(width, size=_TRIES):
        e, k, t = pool[j]
        if e == d and i - n_context <= k <= i or _related(t, true) or any(_related(t, c) for c in chosen):
            continue
        chosen.append(t)
        if len(chosen) == n_choices - 1:
            answer = int(rng.integers(n_choices))
            choices = chosen[:answer] + [true] + chosen[answer:]
            return ClozeItem(docs[d][0], d, i, docs[d][1][spans[d][i - n_context][0]:spans[d][i][0]],
                             tuple(choices), answer)
    return None


# (context, choices) -> (total log-likelihood, scored tokens) per choice
Scorer = Callable[[ClozeItem], list[tuple[float, int]]]


def model_scorer(model: nn.Module, encode: Callable[[str], list[int]], max_seq_len: int,
                 device: torch.device) -> Scorer:
    """Scores with `model`: the candidates of an item in one batch, each after the same context
    (its last max_seq_len // 2 tokens at most; a candidate's first max_seq_len - that tokens at most),
    right-padded (causal attention: padding after a row's end changes nothing before it)."""
    cand_budget = max(1, max_seq_len // 2)

    @torch.inference_mode()
    def score(item: ClozeItem) -> list[tuple[float, int]]:
        cands = [encode(c)[:cand_budget] for c in item.choices]
        ctx = encode(item.context)[-(max_seq_len - max(len(c) for c in cands)):]
        rows = [ctx + c for c in cands]
        width = max(len(r) for r in rows)
        tokens = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
        logits = model(tokens[:, :-1])
        nll = token_nll(logits, tokens[:, 1:]).double().cpu()
        start = len(ctx) - 1  # logits at position p predict token p + 1
        return [(-float(nll[r, start:start + len(c)].sum()), len(c)) for r, c in enumerate(cands)]

    return score


def binomial_stderr(accuracy: float, n: int) -> float:
    """Standard error of an accuracy over n independent items, sqrt(p (1 - p) / n): a few hundred
    items leave ~0.03 of noise, so a small model's 0.28 against chance 0.25 is not a finding."""
    return math.sqrt(accuracy * (1 - accuracy) / n)


def score_items(items: Sequence[ClozeItem], scorer: Scorer) -> dict:
    """Accuracy (total and per-token log-likelihood) with its standard error, chance level and item
    count, overall and per domain."""
    per: dict[str, list[tuple[bool, bool, float]]] = {}
    for item in items:
        scores = scorer(item)
        total = int(np.argmax([s for s, _ in scores]))
        norm = int(np.argmax([s / max(n, 1) for s, n in scores]))
        per.setdefault(item.domain, []).append((total == item.answer, norm == item.answer, 1 / len(item.choices)))

    def summary(rows: list[tuple[bool, bool, float]]) -> dict:
        n = len(rows)
        acc, acc_norm = sum(r[0] for r in rows) / n, sum(r[1] for r in rows) / n
        return {"items": n, "accuracy": acc, "accuracy_stderr": binomial_stderr(acc, n),
                "accuracy_norm": acc_norm, "accuracy_norm_stderr": binomial_stderr(acc_norm, n),
                "chance": sum(r[2] for r in rows) / n}

    everything = [r for rows in per.values() for r in rows]
    out = summary(everything) if everything else {"items": 0}
    out["domains"] = {name: summary(rows) for name, rows in sorted(per.items())}
    return out
