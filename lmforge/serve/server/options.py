"""The server's limits and policies, checked before a model is loaded."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.serve.server.errors import ServeError


@dataclass(frozen=True)
class BreakerOptions:
    """Open after `error_rate` of the last `window` outcomes failed (at least `min_requests` seen);
    a request slower than `slow_s` counts as a failure. Stay open `cooldown_s`, then let
    `probes` requests through (half-open): all succeed -> closed, one fails -> open again."""

    error_rate: float = 0.5
    window: int = 20
    min_requests: int = 5
    slow_s: float = 30.0
    cooldown_s: float = 5.0
    probes: int = 2

    def check(self) -> None:
        _range("--breaker-error-rate", self.error_rate, 0.0, 1.0, low_open=True)
        _at_least("--breaker-window", self.window, 1)
        _at_least("--breaker-min-requests", self.min_requests, 1)
        _range("--breaker-slow", self.slow_s, 0.0, math.inf, low_open=True)
        _range("--breaker-cooldown", self.cooldown_s, 0.0, math.inf, low_open=True)
        _at_least("--breaker-probes", self.probes, 1)


@dataclass(frozen=True)
class ServerOptions:
    model_name: str
    slots: int = 16                 # sequences decoded together (one KV cache region each)
    max_batch_tokens: int = 256     # tokens per engine step: decode tokens first, prefill the rest
    max_queue: int = 64             # sequences waiting for a slot; more -> 429
    default_deadline_s: float = 60.0
    max_deadline_s: float = 600.0
    max_tokens_limit: int = 1024    # the largest max_tokens a request may ask
    default_max_tokens: int = 16    # completions without max_tokens (OpenAI's default)
    max_n: int = 8                  # choices per request (n x prompts)
    max_request_bytes: int = 1 << 20
    max_stop: int = 4               # stop strings per request (OpenAI allows 4)
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # empty: no key needed
    feedback_path: Path | None = None
    remember_completions: int = 10_000  # completion ids kept for feedback
    breaker: BreakerOptions = BreakerOptions()
    drain_s: float = 30.0           # graceful shutdown: the longest wait for in-flight requests
    early_exit_threshold: float | None = None  # requests without early_exit_threshold (None: full depth)

    def check(self, max_seq_len: int) -> None:
        """Every limit in range; one line naming the flag otherwise."""
        _at_least("--slots", self.slots, 1)
        if self.max_batch_tokens <= self.slots:
            raise ServeError(f"--max-batch-tokens {self.max_batch_tokens}: must exceed --slots {self.slots} "
                             "(each step decodes one token per slot and needs room to prefill)")
        _at_least("--max-queue", self.max_queue, 0)
        _range("--default-deadline", self.default_deadline_s, 0.0, self.max_deadline_s, low_open=True)
        _range("--max-deadline", self.max_deadline_s, 0.0, math.inf, low_open=True)
        _range("--max-tokens-limit", self.max_tokens_limit, 1, max_seq_len - 1)
        _range("--default-max-tokens", self.default_max_tokens, 1, self.max_tokens_limit)
        _at_least("--max-n", self.max_n, 1)
        _at_least("--max-request-bytes", self.max_request_bytes, 256)
        _at_least("--remember-completions", self.remember_completions, 1)
        _range("--drain", self.drain_s, 0.0, math.inf)
        if self.early_exit_threshold is not None:
            _range("--early-exit-threshold", self.early_exit_threshold, 0.0, math.inf)
        for key in self.api_keys:
            if len(key) < 8 or any(c.isspace() for c in key):
                raise ServeError("an API key must be at least 8 characters with no whitespace "
                                 "(--api-key / --api-key-file)")
        self.breaker.check()


def _at_least(flag: str, value: int, low: int) -> None:
    if value < low:
        raise ServeError(f"{flag} {value}: must be >= {low}")


def _range(flag: str, value: float, low: float, high: float, low_open: bool = False) -> None:
    ok = (value > low if low_open else value >= low) and value <= high and not math.isnan(value)
    if not ok:
        bound = f"({low}" if low_open else f"[{low}"
        raise ServeError(f"{flag} {value}: must be in {bound}, {high}]")
