"""The bounded queue in front of the engine, and deadlines. A full queue refuses at once (429
with a Retry-After) rather than letting waits grow without bound; a sequence whose request passed
its deadline or was cancelled is dropped when the engine next looks, never run."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from typing import Protocol


class QueueFull(Exception):
    """No room for the request's sequences; `retry_after_s` is the engine's estimate."""

    def __init__(self, retry_after_s: float):
        super().__init__("queue full")
        self.retry_after_s = retry_after_s


class Waiting(Protocol):
    """What the queue needs of a sequence: when its request must be answered by, and whether
    it was cancelled."""

    def expired(self, now: float) -> bool: ...

    @property
    def cancelled(self) -> bool: ...


class AdmissionQueue:
    """FIFO of sequences waiting for a slot, at most `capacity` (not thread-safe: the engine
    holds its lock around every call)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: deque = deque()

    def __len__(self) -> int:
        return len(self._items)

    def offer(self, seqs: list, retry_after_s: float, free_slots: int = 0) -> None:
        """All of `seqs` or none (a request's choices wait together). `free_slots`: slots the
        engine will fill from the queue at its next step; sequences bound for them do not count
        against the capacity."""
        if len(self._items) + len(seqs) > self.capacity + free_slots:
            raise QueueFull(retry_after_s)
        self._items.extend(seqs)

    def drop_dead(self, now: float) -> Iterator:
        """Remove and yield the sequences that were cancelled or whose deadline passed."""
        keep: deque = deque()
        while self._items:
            s = self._items.popleft()
            if s.cancelled or s.expired(now):
                yield s
            else:
                keep.append(s)
        self._items = keep

    def pop(self, k: int) -> list:
        """Up to k sequences in arrival order."""
        return [self._items.popleft() for _ in range(min(k, len(self._items)))]


def retry_after_header(seconds: float) -> dict[str, str]:
    """Retry-After is whole seconds, at least 1."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}
