"""Lets a test that asserts on wall-clock time run alone while the suite runs on several
pytest-xdist workers (scripts/test.sh): another worker's training job would stretch its timings.
Every test holds one lock file shared; a `timed` test holds it exclusively. A second lock, the
turnstile, is passed by every test on its way in and held by a timed test while it waits and runs,
so the other workers' stream of shared holds cannot starve it (flock alone favours no one).
Locks are flock(2) on files in a folder all workers of the run share; they die with the process."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import pytest


class WorkerGate:
    """One worker's handle on the run's two lock files."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._turnstile = os.open(folder / "turnstile.lock", os.O_RDWR | os.O_CREAT, 0o600)
        self._tests = os.open(folder / "tests.lock", os.O_RDWR | os.O_CREAT, 0o600)
        self.alone = False  # an exclusive hold is kept across consecutive timed tests

    def enter(self, alone: bool) -> None:
        """Before a test's setup: exclusive for a timed test, shared otherwise."""
        fcntl.flock(self._turnstile, fcntl.LOCK_EX)
        if alone:
            fcntl.flock(self._tests, fcntl.LOCK_EX)  # the turnstile stays held until leave()
            self.alone = True
            return
        try:
            fcntl.flock(self._tests, fcntl.LOCK_SH)
        finally:
            fcntl.flock(self._turnstile, fcntl.LOCK_UN)

    def leave(self) -> None:
        """After a test's teardown."""
        fcntl.flock(self._tests, fcntl.LOCK_UN)
        if self.alone:
            fcntl.flock(self._turnstile, fcntl.LOCK_UN)
            self.alone = False

    @contextlib.contextmanager
    def hold(self, alone: bool) -> Iterator[None]:
        self.enter(alone)
        try:
            yield
        finally:
            self.leave()

    def close(self) -> None:
        os.close(self._turnstile)
        os.close(self._tests)


GATE: pytest.StashKey[WorkerGate] = pytest.StashKey()  # the worker's gate in its pytest config
