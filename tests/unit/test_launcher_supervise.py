"""The launcher's supervision of torchrun (lmforge/launcher.py `supervise`): a stop signal reaches
the child, again if the child missed it, and a child that never stops has its process group killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from lmforge.launcher import supervise

pytestmark = pytest.mark.timed  # every case bounds how long a stop takes

# Ignores its first `argv[1]` SIGTERMs, then exits with 40 + the number of SIGTERMs it received.
CHILD = r"""
import signal, sys, time
ignore, seen = int(sys.argv[1]), 0
def on_term(sig, frame):
    global seen
    seen += 1
    if seen > ignore:
        sys.exit(40 + seen)
signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
while True:
    time.sleep(0.02)
"""


@pytest.fixture
def sigterm_to_self():
    """Sends this process SIGTERM shortly after `supervise` starts (a no-op handler stands in
    before it, so an early signal fails the test instead of ending pytest)."""
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
    yield timer
    timer.cancel()
    signal.signal(signal.SIGTERM, previous)


def start_child(ignore: int) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(ignore)], stdout=subprocess.PIPE, text=True,
                             process_group=0)
    assert child.stdout.readline().strip() == "ready"
    guard = threading.Timer(20.0, child.kill)  # a broken supervise fails the test instead of hanging it
    guard.daemon = True
    guard.start()
    return child


def test_a_child_that_stops_gets_the_signal_once(sigterm_to_self) -> None:
    child = start_child(ignore=0)
    sigterm_to_self.start()
    t0 = time.monotonic()
    assert supervise(child, resend_after_s=1.0, kill_after_s=5.0) == 41  # one SIGTERM
    assert time.monotonic() - t0 < 1.0


def test_a_missed_stop_signal_is_sent_again(sigterm_to_self) -> None:
    child = start_child(ignore=1)
    sigterm_to_self.start()
    t0 = time.monotonic()
    assert supervise(child, resend_after_s=0.5, kill_after_s=5.0) == 42  # the second SIGTERM stopped it
    assert 0.7 <= time.monotonic() - t0 < 5.0


def test_a_child_that_never_stops_is_killed_with_its_process_group(sigterm_to_self) -> None:
    child = start_child(ignore=10**6)
    sigterm_to_self.start()
    t0 = time.monotonic()
    assert supervise(child, resend_after_s=0.3, kill_after_s=1.5) == -signal.SIGKILL
    assert 1.7 <= time.monotonic() - t0 < 5.0


def test_the_handlers_are_restored_afterwards(sigterm_to_self) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    child = start_child(ignore=0)
    sigterm_to_self.start()
    supervise(child, resend_after_s=1.0, kill_after_s=5.0)
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_stop_signal_taken_by_another_thread_still_reaches_the_child(sigterm_to_self) -> None:
    """The kernel may hand a signal sent to the process to any of its threads (torch's OpenMP
    workers in the launcher), e.g. when the main thread has just been continued after SIGSTOP, as
    Slurm's preemption (SIGCONT, then SIGTERM) or a test freezing the job does. Python then runs
    the handler only when the main thread next runs bytecode: a main thread blocked in waitpid
    never did, and the job trained on (CI saw it). Here the signal goes to a helper thread."""
    child = start_child(ignore=0)
    helper = threading.Timer(0.3, lambda: signal.pthread_kill(threading.get_ident(), signal.SIGTERM))
    helper.start()
    t0 = time.monotonic()
    assert supervise(child, resend_after_s=5.0, kill_after_s=10.0) == 41  # the first SIGTERM, forwarded
    assert time.monotonic() - t0 < 1.5
