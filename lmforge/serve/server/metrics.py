"""Prometheus metrics of one server (prometheus_client), in a registry of its own: two servers in
one process (tests) never share counters, and nothing is global."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.queue_depth = Gauge("lmforge_queue_depth", "sequences waiting for a slot", registry=r)
        self.running = Gauge("lmforge_running_sequences", "sequences holding a slot", registry=r)
        self.batch_size = Histogram("lmforge_batch_size", "sequences per decode step", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.step_tokens = Histogram("lmforge_step_tokens", "tokens per engine step (decode + prefill)",
                                     buckets=(1, 4, 16, 64, 256, 1024, 4096), registry=r)
        self.tokens = Counter("lmforge_generated_tokens", "tokens generated", registry=r)
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.tokens_per_s = Gauge("lmforge_tokens_per_second", "generated tokens/s over the last seconds",
                                  registry=r)
        self.ttft = Histogram("lmforge_time_to_first_token_seconds", "arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("lmforge_request_latency_seconds", "arrival to last token (answered requests)",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("lmforge_queue_wait_seconds", "arrival to a slot", buckets=LATENCY_BUCKETS,
                                    registry=r)
        self.requests = Counter("lmforge_requests", "requests answered, by outcome", ["outcome"], registry=r)
        self.rejections = Counter("lmforge_rejections", "requests refused or dropped, by reason", ["reason"],
                                  registry=r)
        self.safety_blocks = Counter("lmforge_safety_blocks", "content filter blocks, by gate and category",
                                     ["gate", "category"], registry=r)
        self.adversarial_flags = Counter("lmforge_adversarial_flags", "prompts the adversarial detector flagged, "
                                         "by the action taken", ["action"], registry=r)
        self.exit_tokens = Counter("lmforge_early_exit_tokens", "decoded tokens of early-exit requests, by the "
                                   "blocks they ran (the exit layer; the model's depth: no exit)", ["depth"],
                                   registry=r)
        self.breaker_state = Gauge("lmforge_breaker_state", "circuit breaker: 0 closed, 1 half-open, 2 open",
                                   registry=r)

    def reject(self, reason: str) -> None:
        self.rejections.labels(reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
