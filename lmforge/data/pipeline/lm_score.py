"""`lm_score`: a document's perplexity under an n-gram model the pipeline trains on a reference
corpus (`ngram.py`), as a per-shard threshold or as a corpus-wide "keep the best fraction".

    [[steps]]
    type = "lm_score"
    reference = "ref.jsonl"      # a jsonl file ("text"), a directory of text files (relative to the
                                 # TOML), or "default:shakespeare" / "default:kjv" (the embedded corpus)
    order = 3                    # n-gram order
    unit = "word"                # "word" (lower-cased words and punctuation) | "char"
    max_perplexity = 400.0       # EITHER: drop documents above it (per shard, in parallel)
    keep_top_fraction = 0.5      # OR: keep the lowest-perplexity fraction of the whole corpus
    min_count = 2                # reference units seen fewer times are UNK
    cache_dir = "ngram-cache"    # optional: trained models pickled here, reused across runs

Why two modes under one name: a threshold judges each document alone, so it runs inside the
shards; a fraction needs every document's perplexity first, so with `keep_top_fraction` the
executor runs the step as a global step (`is_global`): `decide` scores the whole corpus once in
shard order, keeps round(fraction * N) documents (lowest perplexity first, ties by id), and its decisions
carry every document's score, so each shard's verdicts (`base.DecisionStep`) take their score
from there. Every verdict, kept or dropped, carries the perplexity as its score.
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


    def fingerprint(self) -> str:
        """The model's identity (reference files' paths, sizes, mtimes; options): part of the run's
        plan fingerprint, so a changed reference is not mixed into a resumed run."""
        return fingerprint(self.reference, self.order, self.unit, self.min_count)

    def model(self) -> NgramModel:
        return load_model(self.reference, self.order, self.unit, self.min_count, self.cache_dir)


def _rounded(ppl: float) -> float:
    return round(ppl, 4)


class LmScoreStep(Step):
    """`max_perplexity`: drops a document whose perplexity is above it."""

    name = "lm_score"

    def __init__(self, config: LmScoreConfig, drop: DropSink):
        super().__init__(config, drop)
        self._model: NgramModel | None = None  # loaded on the first document (once per process)

    def process(self, doc: Document) -> bool:
        if self._model is None:
            self._model = self.config.model()
        ppl, n = self._model.perplexity(doc.text)
        ppl = _rounded(ppl)
        limit = self.config.max_perplexity
        if ppl > limit:
            return self.reject(doc, "max_perplexity", ppl, f"perplexity {ppl:.4g} > {limit} ({n} {self.config.unit}s)")
        return self.keep(doc, ppl, f"perplexity {ppl:.4g} <= {limit} ({n} {self.config.unit}s)")


class LmScoreGlobalStep(GlobalStep):
    """`keep_top_fraction`: scores every document, keeps the best round(fraction * N)."""

    name = "lm_score"

    def decide(self, docs: Iterable[Document], workdir: Path) -> Decisions:
        model = self.config.model()
        scores = {doc.id: _rounded(model.perplexity(doc.text)[0]) for doc in docs}
        n = len(scores)
        keep = min(n, math.floor(self.config.keep_top_fraction * n + 0.5))
        ranked = sorted(scores, key=lambda i: (scores[i], i))
        cutoff = scores[ranked[keep - 1]] if keep else None
        d = Decisions(self.name, keep_detail=f"among the best {keep} of {n} by perplexity",
                      reason="keep_top_fraction", scores={i: scores[i] for i in ranked[:keep]})
        for rank, i in enumerate(ranked[keep:], keep + 1):
            d.drops[i] = (None, scores[i], f"perplexity {scores[i]:.4g}, rank {rank} of {n}; kept {keep} "
                                           f"(cutoff {cutoff})")  # type: ignore[assignment]
        d.stats = {"documents": n, "kept": keep, "dropped": n - keep, "cutoff_perplexity": cutoff}
        return d
