"""The `synthetic` step: P(machine-generated) for every document, from a detector the pipeline
trains on reference human text and on passages sampled from a given model; drops documents above
`max_score`, or keeps the `keep_top_fraction` most human-like.

    [[steps]]
    type = "synthetic"
    human = "reference.jsonl"     # human text ({"text": ...} per line; `text_field` names the field)
    machine = "samples.jsonl"     # passages sampled from the model: lmforge data sample RUN ...
    max_score = 0.5               # drop P(machine) > 0.5 ...
    # keep_top_fraction = 0.9     # ... or keep the 90% with the lowest P(machine) (one of the two)

Why a global step: the detector is trained once per run, in one process (`decide`), and cached in
the step's directory of the run (`detector.pkl`, keyed by the two files' sha256 and the detector
options), so a resumed run does not train again; keeping a top fraction needs every score before
it can judge one. Kept documents carry their P(machine) as the verdict score, dropped ones too.
The detector itself (features, training, windows) is `lmforge/data/synthetic.py`.

Where the watermark detector goes (issue 18, not written yet): a watermark test gives its own
per-document evidence of machine text from the token ids and the watermark key, not from style.
It belongs next to `SyntheticDetector.score` in `_score_all` below: both scores per document,
combined into the one P(machine) the threshold and the ranking use (e.g. the larger of the two,
once the watermark's z-score is calibrated to a probability), with its key file as one more
option here and one more input of the fingerprint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from lmforge.config.loader import ConfigError
from lmforge.data.files import sha256_file
from lmforge.data.pipeline.base import Decisions, GlobalStep
from lmforge.data.pipeline.document import Document
from lmforge.data.synthetic import DETECTOR_FORMAT, DetectorOptions, SyntheticDetector, read_jsonl_texts

__all__ = ["SyntheticConfig", "SyntheticStep"]

DETECTOR_FILE = "detector.pkl"
SCORE_BATCH = 512  # documents scored per call (bounded memory on any corpus)


@dataclass(frozen=True)
class SyntheticConfig:
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("human", "machine")  # relative to the TOML (config.py)
    human: str = ""                 # reference human text, jsonl (relative to the TOML file)
    machine: str = ""               # model samples, jsonl with "text" (lmforge data sample)
    text_field: str = "text"        # the text field of the human file
    max_score: float | None = None  # drop documents with P(machine) above this ...
    keep_top_fraction: float | None = None  # ... or keep this fraction with the lowest P(machine)
    max_human_docs: int = 3000      # human documents read for training (a seeded sample when more)
    char_ngram_max: int = 4
    word_ngram_max: int = 2
    max_features: int = 100_000
    c: float = 4.0
    human_per_machine: float = 4.0
    windows: int = 4
    seed: int = 0

    def validate(self, prefix: str, where: str | None) -> None:
        for key in ("human", "machine"):
            path = getattr(self, key)
            if not path:
                raise ConfigError(prefix + key, path, "is required (a jsonl file)", where)
            if not Path(path).is_file():
                raise ConfigError(prefix + key, path, "is not a file", where)
        if (self.max_score is None) == (self.keep_top_fraction is None):
            raise ConfigError(prefix + "max_score", self.max_score, "set exactly one of max_score and keep_top_fraction",
                              where)
        if self.max_score is not None and not 0 <= self.max_score <= 1:
            raise ConfigError(prefix + "max_score", self.max_score, "must be in [0, 1] (a probability)", where)
        if self.keep_top_fraction is not None and not 0 < self.keep_top_fraction <= 1:
            raise ConfigError(prefix + "keep_top_fraction", self.keep_top_fraction, "must be in (0, 1]", where)
        for key in ("max_human_docs", "char_ngram_max", "word_ngram_max", "max_features", "windows"):
            if getattr(self, key) < 1:
                raise ConfigError(prefix + key, getattr(self, key), "must be >= 1", where)
        for key in ("c", "human_per_machine"):
            v = getattr(self, key)
            if not (v > 0 and math.isfinite(v)):
                raise ConfigError(prefix + key, v, "must be a finite number > 0", where)


    def detector_options(self) -> DetectorOptions:
        return DetectorOptions(self.char_ngram_max, self.word_ngram_max, self.max_features, self.c,
                               self.human_per_machine, self.windows, self.seed)


def _batches(docs: Iterable[Document], size: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class SyntheticStep(GlobalStep):
    """Scores every document with a detector trained (or loaded from this run's cache) at the
    start of `decide`; drops by threshold or keeps the most human-like fraction."""

    name = "synthetic"

    def fingerprint(self) -> str:
        c = self.config
        doc = {"format": DETECTOR_FORMAT, "human": sha256_file(Path(c.human)), "machine": sha256_file(Path(c.machine)),
               "text_field": c.text_field, "max_human_docs": c.max_human_docs,
               "options": dataclasses.asdict(c.detector_options())}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def detector(self, workdir: Path) -> tuple[SyntheticDetector, bool]:
        """(the detector, whether it was trained now rather than loaded from `workdir`)."""
        c = self.config
        fp = self.fingerprint()
        cached = SyntheticDetector.load(workdir / DETECTOR_FILE, fp)
        if cached is not None:
            return cached, False
        human = [obj[c.text_field] for _, obj in read_jsonl_texts(Path(c.human), c.text_field)]
        if len(human) > c.max_human_docs:
            human = random.Random(c.seed).sample(human, c.max_human_docs)
        machine = [obj["text"] for _, obj in read_jsonl_texts(Path(c.machine), "text")]
        det = SyntheticDetector(c.detector_options()).fit(human, machine)
        det.save(workdir / DETECTOR_FILE, fp)
        return det, True

    def _score_all(self, det: SyntheticDetector, docs: Iterable[Document]) -> tuple[list[str], np.ndarray]:
        ids: list[str] = []
        scores: list[np.ndarray] = []
        for batch in _batches(docs, SCORE_BATCH):
            ids += [d.id for d in batch]
            scores.append(det.score([d.text for d in batch]))
        return ids, np.concatenate(scores) if scores else np.zeros(0)

    def decide(self, docs: Iterable[Document], workdir: Path) -> Decisions:
        c = self.config
        det, trained = self.detector(workdir)
        ids, scores = self._score_all(det, docs)
        scores = np.round(scores, 6)
        if c.max_score is not None:
            limit = c.max_score
            drop = scores > limit
            keep_detail = f"P(machine) <= max_score {limit}"
            why = f"> max_score {limit}"
        else:
            keep_n = min(len(ids), math.ceil(c.keep_top_fraction * len(ids) - 1e-9))
            order = np.argsort(scores, kind="stable")  # most human-like first; ties in document order
            drop = np.ones(len(ids), dtype=bool)
            drop[order[:keep_n]] = False
            limit = float(scores[order[keep_n - 1]]) if keep_n else float("-inf")
            keep_detail = f"among the {c.keep_top_fraction:g} most human-like (P(machine) <= {limit:.4f})"
            why = f"outside the {c.keep_top_fraction:g} most human-like (kept P(machine) <= {limit:.4f})"
        d = Decisions(self.name, keep_detail=keep_detail, reason="synthetic")
        for i, doc_id in enumerate(ids):
            s = float(scores[i])
            if drop[i]:
                d.drops[doc_id] = (None, s, f"P(machine) {s:.4f} {why}")
            else:
                d.scores[doc_id] = s
        d.stats = {"documents": len(ids), "dropped": int(drop.sum()), "threshold": limit if math.isfinite(limit) else None,
                   "mean_score": round(float(scores.mean()), 6) if len(ids) else None,
                   "detector_trained": trained, **det.info}
        return d
