"""The base classes every pipeline step builds on, apart from the steps themselves so that the step
registries (`steps.STEP_TYPES`, `dedup.GLOBAL_STEP_TYPES`) can import step modules that subclass
them without an import cycle.

`Step` (per shard: `process(doc)` keeps or rejects each document), `StepStats` (its counts per
shard), `GlobalStep` (sees the whole corpus once: `decide(docs, workdir) -> Decisions`) and
`DecisionStep` (applies a global step's decisions inside a shard: a decision drops a document
(deduplication: dedup.py) or labels it, `metadata[label_key] = value` with the verdict's score
and detail (domain tagging: domains.py)). Why a drop sink: every step
must leave a verdict on every document it sees (kept: a "keep" verdict with its score; dropped: a
"drop" verdict, and the document goes to the sink, which the executor writes to the rejects file),
so no document ever vanishes unexplained.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from lmforge.data.files import read_json, write_json_atomic
from lmforge.data.pipeline.document import Document, Verdict

__all__ = ["Decisions", "DecisionStep", "DropSink", "GlobalStep", "Step", "StepStats", "load_decisions",
           "save_decisions"]

DropSink = Callable[[Document, str, str], None]  # (document, reason token, detail)


class Step(ABC):
    """One stage of the chain. `run` streams documents through `process`, which returns True to
    keep the document (after `keep`) or False after `reject` has sent it to the drop sink."""

    name: ClassVar[str]

    def __init__(self, config: Any, drop: DropSink):
        self.config = config
        self._drop = drop
        self.stats = StepStats()

    def run(self, docs: Iterator[Document]) -> Iterator[Document]:
        stats = self.stats
        for doc in docs:
            t0 = time.perf_counter()
            kept = self.process(doc)
            stats.seconds += time.perf_counter() - t0
            stats.seen += 1
            if kept:
                stats.kept += 1
                yield doc

    @abstractmethod
    def process(self, doc: Document) -> bool:
        """Judge (and possibly rewrite) `doc`; call `keep` or `reject` exactly once."""

    def keep(self, doc: Document, score: float | None, detail: str) -> bool:
        doc.provenance.append(Verdict(self.name, "keep", score, detail))
        return True

    def reject(self, doc: Document, reason: str, score: float | None, detail: str,
               duplicate_of: str | None = None) -> bool:
        doc.provenance.append(Verdict(self.name, "drop", score, f"{reason}: {detail}", duplicate_of))
        self.stats.dropped[reason] += 1
        self._drop(doc, reason, detail)
        return False


@dataclass
class StepStats:
    """What one step did in one shard: documents seen and kept, drops per reason, and the seconds
    spent in the step itself (not in the steps before it), for the run's throughput table."""

    seen: int = 0
    kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {"seen": self.seen, "kept": self.kept, "dropped": dict(sorted(self.dropped.items())),
                "seconds": round(self.seconds, 6)}


@dataclass
class Decisions:
    """What a global step decided: `drops` maps a dropped id to (the id it duplicates or None,
    score, detail), dropped with reason `reason`; every other document is kept with `keep_detail`
    and its score in `scores` (None when absent), or, when it is in `labels` (id -> (value, score,
    detail)), kept with that score and detail and `metadata[label_key] = value`. `stats`: counts
    for stats.json. `drop_reasons`: the drops a step made for another reason than `reason`."""

    step: str
    drops: dict[str, tuple[str | None, float | None, str]] = field(default_factory=dict)
    keep_detail: str = "unique"
    stats: dict[str, Any] = field(default_factory=dict)
    label_key: str = ""
    labels: dict[str, tuple[str, float | None, str]] = field(default_factory=dict)
    reason: str = "duplicate"
    scores: dict[str, float] = field(default_factory=dict)
    drop_reasons: dict[str, str] = field(default_factory=dict)  # id -> its reason, where not `reason`


def save_decisions(path: Path, d: Decisions) -> None:
    obj: dict[str, Any] = {"step": d.step, "keep_detail": d.keep_detail, "stats": d.stats, "reason": d.reason,
                           "drops": {k: list(v) for k, v in sorted(d.drops.items())},
                           "scores": dict(sorted(d.scores.items()))}
    if d.drop_reasons:
        obj["drop_reasons"] = dict(sorted(d.drop_reasons.items()))
    if d.label_key:
        obj["label_key"] = d.label_key
        obj["labels"] = {k: list(v) for k, v in sorted(d.labels.items())}
    write_json_atomic(path, obj)


def load_decisions(path: Path) -> Decisions | None:
    """The decisions written by `save_decisions`, or None when the file is missing or partial."""
    obj = read_json(path)
    if obj is None or "drops" not in obj:
        return None
    return Decisions(obj["step"], {k: (v[0], v[1], v[2]) for k, v in obj["drops"].items()},
                     obj["keep_detail"], obj["stats"], obj.get("label_key", ""),
                     {k: (v[0], v[1], v[2]) for k, v in obj.get("labels", {}).items()},
                     obj.get("reason", "duplicate"), obj.get("scores", {}), obj.get("drop_reasons", {}))


class GlobalStep(ABC):
    """A step that must see the whole corpus before it can judge one document."""

    name: ClassVar[str]

    def __init__(self, config: Any, run_id: str):
        self.config = config
        self.run_id = run_id

    @abstractmethod
    def decide(self, docs: Iterable[Document], workdir: Path) -> Decisions:
        """Read every document (in shard order) once; return which to drop. `workdir`: this
        step's own directory in the run, for anything `finish_run` needs later (a resumed run
        calls `finish_run` without calling `decide` again)."""

    def finish_run(self, workdir: Path) -> None:  # noqa: B027 (most global steps have nothing to finish)
        """Called once the whole run has finished (after the final merge)."""


class DecisionStep(Step):
    """Applies a global step's decisions inside a shard, with the global step's name."""

    def __init__(self, decisions: Decisions, drop: DropSink):
        super().__init__(decisions, drop)
        self.name = decisions.step  # type: ignore[misc]  (an instance name: one class for every global step)

    def process(self, doc: Document) -> bool:
        d: Decisions = self.config
        hit = d.drops.get(doc.id)
        if hit is not None:
            dup_of, score, detail = hit
            return self.reject(doc, d.drop_reasons.get(doc.id, d.reason), score, detail, duplicate_of=dup_of)
        label = d.labels.get(doc.id) if d.label_key else None
        if label is None:
            return self.keep(doc, d.scores.get(doc.id), d.keep_detail)
        value, score, detail = label
        doc.metadata[d.label_key] = value
        return self.keep(doc, score, detail)
