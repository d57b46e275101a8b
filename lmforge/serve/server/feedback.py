"""Feedback on completions, kept as preference data for later fine-tuning: one JSON record per
line, appended, flushed and fsynced before the request is answered (crash-safe: a record the
client saw acknowledged is on disk). A crash mid-write can leave a torn last line: readers skip
it, and the store cuts it off before its next append so it never glues onto a new record.
Only completion ids this server issued (and still remembers) are accepted."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from lmforge.storage.atomic import fsync_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Issued:
    """What a completion id stands for: the prompt(s) and every choice's text."""

    prompts: tuple[str, ...]
    choices: tuple[str, ...]
    kind: str  # "text_completion" or "chat.completion"


class IssuedCompletions:
    """The last `capacity` completion ids this server answered (thread-safe, bounded)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._lock = threading.Lock()
        self._items: OrderedDict[str, Issued] = OrderedDict()

    def add(self, cid: str, issued: Issued) -> None:
        with self._lock:
            self._items[cid] = issued
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, cid: str) -> Issued | None:
        with self._lock:
            return self._items.get(cid)


def read_records(path: Path) -> list[dict]:
    """Every complete record; a torn last line (no newline: the write a crash cut) is skipped."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    complete = data.split(b"\n")[:-1]  # what follows the last newline is empty or torn
    return [json.loads(line) for line in complete if line.strip()]


class FeedbackStore:
    """Append-only JSONL of feedback records (one writer lock per store)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()

    def append(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        with self._lock:
            created = not self.path.exists()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                self._cut_torn_tail(fd)
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            if created:
                fsync_dir(self.path.parent)

    def _cut_torn_tail(self, fd: int) -> None:
        """A last line without its newline is a write a crash interrupted: never acknowledged,
        so it is dropped rather than joined to the next record."""
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return
        back = min(size, 1 << 20)
        chunk = os.pread(fd, back, size - back)
        cut = chunk.rfind(b"\n")
        keep = size - back + cut + 1 if cut >= 0 else (0 if back == size else size)
        log.warning("feedback store %s: dropping a torn last record (%d bytes)", self.path, size - keep)
        os.ftruncate(fd, keep)


def feedback_record(cid: str, issued: Issued, rating: int | None, choice: int, preferred: int | None,
                    comment: str | None) -> dict:
    """The stored form: enough to build SFT/DPO data without the server (prompt, texts, verdict)."""
    rec: dict = {"time": round(time.time(), 3), "id": cid, "kind": issued.kind, "prompts": list(issued.prompts)}
    if preferred is not None:
        rec["preferred_choice"] = preferred
        rec["chosen"] = issued.choices[preferred]
        rec["rejected"] = [c for i, c in enumerate(issued.choices) if i != preferred]
    else:
        rec["rating"] = rating
        rec["choice"] = choice
        rec["completion"] = issued.choices[choice]
    if comment:
        rec["comment"] = comment
    return rec
