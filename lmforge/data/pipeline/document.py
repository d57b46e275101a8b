"""One document as it travels through the pipeline, with a record of what every step decided.

Why a provenance list: a filtered corpus is only trustworthy when each kept or dropped document
says which step judged it, with which value; the writers store it next to the text.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Document", "Reject", "Verdict", "content_hash"]


@dataclass(frozen=True)
class Verdict:
    """What one step decided about one document: `verdict` is "keep" or "drop"; `score` the value
    the decision rested on (None when there is none); `detail` a short human-readable reason."""

    step: str
    verdict: str
    score: float | None
    detail: str
    duplicate_of: str | None = None  # dedup drops: the id of the kept document this one repeats

    def as_json(self) -> dict[str, Any]:
        out = {"step": self.step, "verdict": self.verdict, "score": self.score, "detail": self.detail}
        if self.duplicate_of is not None:
            out["duplicate_of"] = self.duplicate_of
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Verdict:
        return cls(obj["step"], obj["verdict"], obj["score"], obj["detail"], obj.get("duplicate_of"))


@dataclass
class Document:
    """`id` is deterministic (`<source>:<line or row>` or `<source>/<file>`), so reruns and any
    number of workers name documents identically; `offset` is the 1-based line of a jsonl file,
    the 0-based row of a parquet file, or 0 for a whole text file."""

    id: str
    text: str
    source: str
    offset: int
    metadata: dict[str, Any] = field(default_factory=dict)
    provenance: list[Verdict] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "source": self.source, "offset": self.offset,
                "metadata": self.metadata, "provenance": [v.as_json() for v in self.provenance]}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Document:
        """A document as `as_json` wrote it (a later pipeline stage reads an earlier one's output)."""
        return cls(obj["id"], obj["text"], obj["source"], obj["offset"], obj["metadata"],
                   [Verdict.from_json(v) for v in obj["provenance"]])


@dataclass(frozen=True)
class Reject:
    """An input record that could not become a document (or a document a step dropped):
    `stage` is "read" or the step's name, `reason` a fixed token (e.g. "malformed_json"),
    `detail` the specifics."""

    id: str
    source: str
    offset: int
    stage: str
    reason: str
    detail: str = ""
    provenance: tuple[Verdict, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "source": self.source, "offset": self.offset, "stage": self.stage,
                "reason": self.reason, "detail": self.detail, "provenance": [v.as_json() for v in self.provenance]}


_SPACE = re.compile(r"\s+")


def content_hash(text: str) -> str:
    """sha256 of the NFC-normalised text with whitespace runs collapsed to one space and the ends
    stripped: two documents that differ only in encoding form or spacing hash alike."""
    norm = _SPACE.sub(" ", unicodedata.normalize("NFC", text)).strip()
    return hashlib.sha256(norm.encode("utf-8")).hexdigest()
