"""`lm_score`: a document's perplexity under an n-gram model the pipeline trains on a reference
corpus (`ngram.py`), as a per-shard threshold or as a corpus-wide "keep the best fraction".

    [[steps]]
    type = "lm_score"
    reference = "ref.jsonl"      # a jsonl file ("text"), a directory of text files (relative to the
                                 # TOML), or "default:shakespeare" / "default:kjv" (the embedded corpus)
    order = 3                    # n-gram order
    unit = "word"                # "word" (lower-cased words, a Han or kana character each, punctuation) | "char"
    max_perplexity = 400.0       # EITHER: drop documents above it (per shard, in parallel)
    keep_top_fraction = 0.5      # OR: keep the lowest-perplexity fraction of the whole corpus
    min_count = 2                # reference units seen fewer times are UNK
    max_unknown_fraction = 0.5   # optional: drop documents whose units are mostly UNK (not scored)
    cache_dir = "ngram-cache"    # optional: trained models pickled here, reused across runs

Why two modes under one name: a threshold judges each document alone, so it runs inside the
shards; a fraction needs every document's perplexity first, so with `keep_top_fraction` the
executor runs the step as a global step (`is_global`): `decide` scores the whole corpus once in
shard order, keeps round(fraction * N) documents (lowest perplexity first, ties by id), and its decisions
carry every document's score, so each shard's verdicts (`base.DecisionStep`) take their score
from there. Every verdict, kept or dropped, carries the perplexity as its score, and its detail
says how many units were scored and what share of them the reference never saw.

Why `max_unknown_fraction`: every unit the reference lacks is the one trained UNK, so a document
in a language the reference does not cover reads as a run of UNKs, and its perplexity comes out
low (Chinese news against the embedded English references: a median of ~200, below held-out
Shakespeare's ~400). Such a document cannot be judged by this model; with the option set it is
dropped as `max_unknown_fraction` and, with `keep_top_fraction`, not ranked at all.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from lmforge.config.loader import ConfigError
from lmforge.data.pipeline.base import Decisions, DropSink, GlobalStep, Step
from lmforge.data.pipeline.document import Document
from lmforge.data.pipeline.ngram import DEFAULT_REFERENCES, NgramModel, fingerprint, load_model

__all__ = ["LmScoreConfig", "LmScoreGlobalStep", "LmScoreStep"]


@dataclass(frozen=True)
class LmScoreConfig:
    # relative to the TOML (config.py); "default:<name>" references are names, not paths
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("reference", "cache_dir")
    reference: str = ""
    order: int = 3
    unit: Literal["word", "char"] = "word"
    max_perplexity: float | None = None
    keep_top_fraction: float | None = None
    min_count: int = 2
    max_unknown_fraction: float | None = None
    cache_dir: str = ""

    @property
    def is_global(self) -> bool:
        """With `keep_top_fraction` the step needs the whole corpus: the executor runs it as a global step."""
        return self.keep_top_fraction is not None

    def validate(self, prefix: str, where: str | None) -> None:
        if not self.reference:
            raise ConfigError(prefix + "reference", self.reference,
                              "is required: a .jsonl file, a directory of text files, or one of "
                              + ", ".join(DEFAULT_REFERENCES), where)
        if self.reference.startswith("default:"):
            if self.reference not in DEFAULT_REFERENCES:
                raise ConfigError(prefix + "reference", self.reference,
                                  "unknown embedded corpus; known: " + ", ".join(DEFAULT_REFERENCES), where)
        elif not Path(self.reference).exists():
            raise ConfigError(prefix + "reference", self.reference, "does not exist", where)
        if not 1 <= self.order <= 10:
            raise ConfigError(prefix + "order", self.order, "must be 1..10", where)
        if self.min_count < 1:
            raise ConfigError(prefix + "min_count", self.min_count, "must be >= 1", where)
        if (self.max_perplexity is None) == (self.keep_top_fraction is None):
            raise ConfigError(prefix + "max_perplexity", self.max_perplexity,
                              "set exactly one of max_perplexity and keep_top_fraction", where)
        if self.max_perplexity is not None and not self.max_perplexity > 0:
            raise ConfigError(prefix + "max_perplexity", self.max_perplexity, "must be > 0", where)
        if self.keep_top_fraction is not None and not 0 < self.keep_top_fraction <= 1:
            raise ConfigError(prefix + "keep_top_fraction", self.keep_top_fraction, "must be in (0, 1]", where)
        if self.max_unknown_fraction is not None and not 0 <= self.max_unknown_fraction < 1:
            raise ConfigError(prefix + "max_unknown_fraction", self.max_unknown_fraction, "must be in [0, 1)", where)


    def fingerprint(self) -> str:
        """The model's identity (reference files' paths, sizes, mtimes; options): part of the run's
        plan fingerprint, so a changed reference is not mixed into a resumed run."""
        return fingerprint(self.reference, self.order, self.unit, self.min_count)

    def model(self) -> NgramModel:
        return load_model(self.reference, self.order, self.unit, self.min_count, self.cache_dir)


def _rounded(ppl: float) -> float:
    return round(ppl, 4)


def _units(n: int, unknown: int, unit: str) -> str:
    return f"{n:,} {unit}s, {unknown / n:.0%} unknown to the reference"


def _unscorable(config: LmScoreConfig, n: int, unknown: int) -> str | None:
    """Why the model cannot judge this document (too many units it never saw), or None."""
    limit = config.max_unknown_fraction
    if limit is None or unknown / n <= limit:
        return None
    return f"{_units(n, unknown, config.unit)} (> {limit:.0%}): the model cannot judge it"


class LmScoreStep(Step):
    """`max_perplexity`: drops a document whose perplexity is above it."""

    name = "lm_score"

    def __init__(self, config: LmScoreConfig, drop: DropSink):
        super().__init__(config, drop)
        self._model: NgramModel | None = None  # loaded on the first document (once per process)

    def process(self, doc: Document) -> bool:
        if self._model is None:
            self._model = self.config.model()
        ppl, n, unknown = self._model.score(doc.text)
        ppl = _rounded(ppl)
        why = _unscorable(self.config, n, unknown)
        if why is not None:
            return self.reject(doc, "max_unknown_fraction", ppl, f"perplexity {ppl:.4g} not used: {why}")
        limit = self.config.max_perplexity
        units = _units(n, unknown, self.config.unit)
        if ppl > limit:
            return self.reject(doc, "max_perplexity", ppl, f"perplexity {ppl:.4g} > {limit} ({units})")
        return self.keep(doc, ppl, f"perplexity {ppl:.4g} <= {limit} ({units})")


class LmScoreGlobalStep(GlobalStep):
    """`keep_top_fraction`: scores every document, keeps the best round(fraction * N)."""

    name = "lm_score"

    def decide(self, docs: Iterable[Document], workdir: Path) -> Decisions:
        model = self.config.model()
        scores: dict[str, float] = {}
        unscorable: dict[str, tuple[float, str]] = {}
        for doc in docs:
            ppl, units, unknown = model.score(doc.text)
            why = _unscorable(self.config, units, unknown)
            if why is None:
                scores[doc.id] = _rounded(ppl)
            else:
                unscorable[doc.id] = (_rounded(ppl), why)
        n = len(scores)
        keep = min(n, math.floor(self.config.keep_top_fraction * n + 0.5))
        ranked = sorted(scores, key=lambda i: (scores[i], i))
        cutoff = scores[ranked[keep - 1]] if keep else None
        d = Decisions(self.name, keep_detail=f"among the best {keep} of {n} by perplexity",
                      reason="keep_top_fraction", scores={i: scores[i] for i in ranked[:keep]})
        for rank, i in enumerate(ranked[keep:], keep + 1):
            d.drops[i] = (None, scores[i], f"perplexity {scores[i]:.4g}, rank {rank} of {n}; kept {keep} "
                                           f"(cutoff {cutoff})")  # type: ignore[assignment]
        for i, (ppl, why) in unscorable.items():
            d.drops[i] = (None, ppl, f"perplexity {ppl:.4g} not ranked: {why}")  # type: ignore[assignment]
            d.drop_reasons[i] = "max_unknown_fraction"
        d.stats = {"documents": n + len(unscorable), "ranked": n, "kept": keep, "dropped": n - keep + len(unscorable),
                   "unscorable": len(unscorable), "cutoff_perplexity": cutoff}
        return d
