"""Global steps: steps that must see the whole corpus before they can judge one document.

The executor runs them in two halves (executor.py): `GlobalStep.decide` reads every document once,
in shard order, in one process, and returns `Decisions`, saved to a file; then every shard applies
them in parallel through `DecisionStep`, which leaves the same provenance verdicts as any other
step. A decision can drop a document (deduplication: `dedup.py`) or label it: `labels` maps an id
to a value stored in `metadata[label_key]` with the verdict's score and detail (domain tagging:
`domains.py`). The decisions depend only on the documents and their order, never on the worker
count or executor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from lmforge.data.files import read_json, write_json_atomic
from lmforge.data.pipeline.document import Document
from lmforge.data.pipeline.steps import DropSink, Step

__all__ = ["Decisions", "DecisionStep", "GlobalStep", "load_decisions", "save_decisions"]


@dataclass
class Decisions:
    """What a global step decided: `drops` maps a dropped id to (the id it duplicates, score,
    detail); every other document is kept with `keep_detail`, or, when it is in `labels`
    (id -> (value, score, detail)), kept with that score and detail and `metadata[label_key] =
    value`. `stats`: counts for stats.json."""

    step: str
    drops: dict[str, tuple[str, float | None, str]] = field(default_factory=dict)
    keep_detail: str = "unique"
    stats: dict[str, Any] = field(default_factory=dict)
    label_key: str = ""
    labels: dict[str, tuple[str, float | None, str]] = field(default_factory=dict)


def save_decisions(path: Path, d: Decisions) -> None:
    obj: dict[str, Any] = {"step": d.step, "keep_detail": d.keep_detail, "stats": d.stats,
                           "drops": {k: list(v) for k, v in sorted(d.drops.items())}}
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
                     {k: (v[0], v[1], v[2]) for k, v in obj.get("labels", {}).items()})


class GlobalStep(ABC):
    """A step that must see the whole corpus before it can judge one document."""

    name: ClassVar[str]

    def __init__(self, config: Any, run_id: str):
        self.config = config
        self.run_id = run_id

    @abstractmethod
    def decide(self, docs: Iterable[Document], workdir: Path) -> Decisions:
        """Read every document (in shard order) once; return which to drop or how to label them.
        `workdir`: this step's own directory in the run, for anything `finish_run` needs later (a
        resumed run calls `finish_run` without calling `decide` again)."""

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
            return self.reject(doc, "duplicate", score, detail, duplicate_of=dup_of)
        label = d.labels.get(doc.id) if d.label_key else None
        if label is None:
            return self.keep(doc, None, d.keep_detail)
        value, score, detail = label
        doc.metadata[d.label_key] = value
        return self.keep(doc, score, detail)
