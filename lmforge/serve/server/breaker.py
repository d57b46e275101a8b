"""A circuit breaker over request outcomes (errors and too-slow answers): closed -> open when the
recent failure rate passes a threshold; open refuses everything (503) for a cool-down; then
half-open lets a few probe requests through, which close it again or re-open it."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from lmforge.serve.server.options import BreakerOptions

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
STATE_CODE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}  # the /metrics gauge


class CircuitBreaker:
    """Thread-safe: the engine thread records outcomes while request handlers ask `allow`."""

    def __init__(self, opts: BreakerOptions, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[str], None] | None = None):
        self.opts = opts
        self._clock = clock
        self._on_change = on_change
        self._lock = threading.Lock()
        self._outcomes: deque[bool] = deque(maxlen=opts.window)  # True = failure
        self._state = CLOSED
        self._opened_at = 0.0
        self._probes_out: list[float] = []  # admission times of half-open probes not yet finished
        self._probes_ok = 0

    @property
    def state(self) -> str:
        with self._lock:
            self._tick()
            return self._state

    def retry_after(self) -> float:
        """Seconds until an open breaker half-opens (0 when it is not open)."""
        with self._lock:
            self._tick()
            return max(0.0, self._opened_at + self.opts.cooldown_s - self._clock()) if self._state == OPEN else 0.0

    def allow(self) -> bool:
        """Whether a new request may go to the model now (a half-open breaker admits its probes)."""
        with self._lock:
            self._tick()
            if self._state == CLOSED:
                return True
            if self._state == HALF_OPEN and len(self._probes_out) + self._probes_ok < self.opts.probes:
                self._probes_out.append(self._clock())
                return True
            return False

    def record(self, failed: bool, latency_s: float | None = None) -> None:
        """One admitted request's outcome; an answer slower than `slow_s` is a failure too."""
        failed = failed or (latency_s is not None and latency_s > self.opts.slow_s)
        with self._lock:
            self._tick()
            if self._state == HALF_OPEN:
                if self._probes_out:
                    self._probes_out.pop(0)
                if failed:
                    self._open()
                else:
                    self._probes_ok += 1
                    if self._probes_ok >= self.opts.probes:
                        self._set(CLOSED)
                        self._outcomes.clear()
                return
            if self._state == OPEN:
                return  # admitted before it opened: the decision is made
            self._outcomes.append(failed)
            n = len(self._outcomes)
            if n >= self.opts.min_requests and sum(self._outcomes) / n >= self.opts.error_rate:
                self._open()

    def release(self) -> None:
        """An allowed request that never reached the model (queue full, draining, client gone):
        a half-open breaker may let another probe through instead."""
        with self._lock:
            if self._state == HALF_OPEN and self._probes_out:
                self._probes_out.pop()

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._set(OPEN)

    def _tick(self) -> None:
        now = self._clock()
        if self._state == OPEN and now >= self._opened_at + self.opts.cooldown_s:
            self._probes_out, self._probes_ok = [], 0
            self._set(HALF_OPEN)
        elif self._state == HALF_OPEN and self._probes_out and now - self._probes_out[0] > self.opts.slow_s:
            self._open()  # a probe that never answered is a failure, not a breaker stuck half-open

    def _set(self, state: str) -> None:
        if state != self._state:
            self._state = state
            if self._on_change is not None:
                self._on_change(state)
