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
shard order, keeps round(fraction * N) documents (lowest perplexity first, ties by id) and writes
every score to its work directory, from which each shard's verdicts take their score. Every
verdict, kept or dropped, carries the perplexity as its score.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmforge.config.loader import ConfigError
from lmforge.data.errors import DataError
from lmforge.data.pipeline.base import Decisions, DecisionStep, DropSink, GlobalStep, Step
from lmforge.data.pipeline.document import Document
from lmforge.data.pipeline.ngram import DEFAULT_REFERENCES, NgramModel, fingerprint, load_model
from lmforge.storage.atomic import atomic_open

__all__ = ["LmScoreConfig", "LmScoreGlobalStep", "LmScoreStep"]

SCORES = "scores.json"  # the global mode's perplexity of every document, by id


@dataclass(frozen=True)
class LmScoreConfig:
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

    def resolve_paths(self, base: Path) -> LmScoreConfig:
        out = self
        if self.reference and not self.reference.startswith("default:") and not Path(self.reference).is_absolute():
            out = dataclasses.replace(out, reference=str(base / self.reference))
        if self.cache_dir and not Path(self.cache_dir).is_absolute():
            out = dataclasses.replace(out, cache_dir=str(base / self.cache_dir))
        return out

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
        d = Decisions(self.name, keep_detail=f"among the best {keep} of {n} by perplexity")
        for rank, i in enumerate(ranked[keep:], keep + 1):
            d.drops[i] = (None, scores[i], f"perplexity {scores[i]:.4g}, rank {rank} of {n}; kept {keep} "
                                           f"(cutoff {cutoff})")  # type: ignore[assignment]
        d.stats = {"documents": n, "kept": keep, "dropped": n - keep, "cutoff_perplexity": cutoff}
        with atomic_open(workdir / SCORES, "w", encoding="utf-8") as f:
            json.dump(scores, f, sort_keys=True)
        return d

    @classmethod
    def decision_step(cls, decisions: Decisions, workdir: Path, drop: DropSink) -> Step:
        return _ApplyTopFraction(decisions, workdir, drop)


@functools.lru_cache(maxsize=1)
def _load_scores(path: str, mtime_ns: int) -> dict[str, float]:
    """The scores file, read once per process while it is unchanged (every shard needs it)."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class _ApplyTopFraction(DecisionStep):
    """Applies the global decisions; kept documents' verdicts carry their perplexity too."""

    def __init__(self, decisions: Decisions, workdir: Path, drop: DropSink):
        super().__init__(decisions, drop)
        path = workdir / SCORES
        if not path.is_file():
            raise DataError(f"{path} is missing; delete {workdir} and rerun")
        self._scores = _load_scores(str(path), path.stat().st_mtime_ns)

    def process(self, doc: Document) -> bool:
        hit = self.config.drops.get(doc.id)
        if hit is None:
            return self.keep(doc, self._scores.get(doc.id), self.config.keep_detail)
        return self.reject(doc, "keep_top_fraction", hit[1], hit[2])
