"""The gate that lets `timed` tests run alone under pytest-xdist (tests/helpers/worker_gate.py).
Each gate below opens its own lock files, as each worker process does, so flock sets them against
one another even from threads of this one process. The last two cases check, in the suite's own
run on workers, that conftest.py's hook holds the gate as each test's marker says."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

import pytest

from tests.helpers.worker_gate import GATE, WorkerGate


def _wait_until_held(lock: Path, timeout_s: float = 10.0) -> None:
    """Until another descriptor holds `lock` (a fixed sleep would race on a loaded machine)."""
    fd = os.open(lock, os.O_RDWR)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return
            fcntl.flock(fd, fcntl.LOCK_UN)
            time.sleep(0.005)
        raise AssertionError(f"{lock.name} was never taken")
    finally:
        os.close(fd)


def test_a_timed_test_waits_for_running_ones_and_the_next_ones_wait_for_it(tmp_path: Path) -> None:
    gates = [WorkerGate(tmp_path) for _ in range(3)]
    t: dict[str, float] = {}

    def hold(name: str, gate: WorkerGate, alone: bool, seconds: float) -> None:
        with gate.hold(alone):
            t[f"{name} in"] = time.monotonic()
            time.sleep(seconds)
            t[f"{name} out"] = time.monotonic()

    try:
        with gates[0].hold(alone=False):  # a test running on one worker
            timed = threading.Thread(target=hold, args=("timed", gates[1], True, 0.2))
            timed.start()
            _wait_until_held(tmp_path / "turnstile.lock")  # the timed test now waits for the running one
            # Another worker's next test: it must queue behind the timed test, not slip in beside
            # the running one (shared locks alone would let it, and a stream of them starve timed).
            late = threading.Thread(target=hold, args=("late", gates[2], False, 0.0))
            late.start()
            time.sleep(0.3)
            assert not t, t  # neither has started while the first test runs
            released = time.monotonic()
        timed.join(5)
        late.join(5)
    finally:
        for gate in gates:
            gate.close()
    assert released <= t["timed in"] < t["timed out"] <= t["late in"], t


def test_tests_that_are_not_timed_run_side_by_side(tmp_path: Path) -> None:
    first, second = WorkerGate(tmp_path), WorkerGate(tmp_path)
    try:
        with first.hold(alone=False):
            entered = threading.Event()

            def run() -> None:
                with second.hold(alone=False):
                    entered.set()

            thread = threading.Thread(target=run)
            thread.start()
            assert entered.wait(2.0)  # entered while the first still runs
            thread.join(2.0)
    finally:
        first.close()
        second.close()


def _gate_of_this_worker(config: pytest.Config) -> WorkerGate:
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        pytest.skip("the suite runs in one process (-n 0): no gate to check")
    return config.stash[GATE]


@pytest.mark.timed
def test_under_xdist_a_timed_test_holds_the_gate_alone(request: pytest.FixtureRequest) -> None:
    assert _gate_of_this_worker(request.config).alone


def test_under_xdist_other_tests_share_the_gate(request: pytest.FixtureRequest) -> None:
    assert not _gate_of_this_worker(request.config).alone
