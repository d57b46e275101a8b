"""The continuous-batching engine: one thread owns the model and a KV cache of `slots` sequence
slots (models/common/kv_cache.py: SlotKVCache). Each step it drops what was cancelled or ran
past its deadline, moves waiting sequences into free slots, and runs what the scheduler planned
under the token budget: one batched forward that decodes a token for every running sequence, then
prefill chunks of new prompts. New requests thus join the running batch between steps, and a
finished one leaves at once. Sampling is generate.py's (`sample_next_token`), per sequence with
its own seeded generator, so a request's tokens do not depend on what else runs with it. The
server's safety (guards.py) acts here too: the watermark's bias on the logits before sampling, and
each choice's text through the output gate.

Request handlers live on the asyncio loop; they see a request only through the events its
`sink` receives (called from this thread; the app hands them to the loop thread-safely).
"""

from __future__ import annotations

import heapq
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lmforge.models.llama.model import Transformer
from lmforge.serve.early_exit import slot_exit_forward
from lmforge.serve.generate import sample_next_token
from lmforge.serve.server.admission import AdmissionQueue
from lmforge.serve.server.breaker import CircuitBreaker
from lmforge.serve.server.guards import GuardedText, ServeSafety
from lmforge.serve.server.metrics import ServerMetrics
from lmforge.serve.server.options import ServerOptions
from lmforge.serve.server.scheduler import plan_step
from lmforge.serve.server.text import IncrementalText

log = logging.getLogger(__name__)

Event = tuple  # ("delta", index, text) | ("finish", index, reason, tokens) | ("error", status, message, code)


class ShuttingDown(Exception):
    """The server is draining: no new requests."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stops: tuple[str, ...] = ()
    early_exit_threshold: float | None = None  # serve/early_exit.py: slot_exit_forward (None: full depth)


class GenRequest:
    """One API request: `n` choices of each prompt, all answered by `deadline` (monotonic clock)."""

    def __init__(self, prompts: list[list[int]], n: int, params: SamplingParams, deadline: float,
                 sink: Callable[[Event], None], arrival: float):
        self.params, self.deadline, self.sink, self.arrival = params, deadline, sink, arrival
        base_seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(6), "little")
        self.seqs = [Sequence(self, i * n + j, ids, base_seed + i * n + j)
                     for i, ids in enumerate(prompts) for j in range(n)]
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.cancelled = False  # set by the handler (client gone); read by the engine thread
        self.failed = False
        self.first_token_at: float | None = None
        self._left = len(self.seqs)

    def over(self, now: float) -> bool:
        return self.cancelled or self.failed or now > self.deadline


class Sequence:
    """One choice: its prompt, what is in its slot's cache (`fed`), its output so far."""

    def __init__(self, req: GenRequest, index: int, prompt: list[int], seed: int):
        self.req, self.index, self.prompt = req, index, prompt
        self.fed = 0
        self.out: list[int] = []
        self.slot = -1
        self.generator = torch.Generator().manual_seed(seed) if req.params.temperature > 0 else None
        self.text: IncrementalText | GuardedText | None = None  # made by the engine (it has the tokenizer)

    @property
    def prefill_left(self) -> int:
        return len(self.prompt) - self.fed if self.fed < len(self.prompt) else 0

    @property
    def cancelled(self) -> bool:
        return self.req.cancelled or self.req.failed

    def expired(self, now: float) -> bool:
        return now > self.req.deadline


class Engine:
    def __init__(self, model: Transformer, decode: Callable[[list[int]], str], eos_id: int | None,
                 opts: ServerOptions, metrics: ServerMetrics, breaker: CircuitBreaker,
                 clock: Callable[[], float] = time.monotonic, prefill_chunk: int | None = None,
                 safety: ServeSafety | None = None):
        self.model, self.decode, self.eos_id = model, decode, eos_id
        self.safety = safety or ServeSafety()
        self.opts, self.metrics, self.breaker, self.clock = opts, metrics, breaker, clock
        self.max_len = model.cfg.max_seq_len
        self.n_layers = model.cfg.n_layers  # the depth a full forward counts in /metrics
        self.prefill_chunk = prefill_chunk or opts.max_batch_tokens - opts.slots
        self.cache = model.new_slot_cache(opts.slots, self.max_len)
        self._free = list(range(opts.slots))  # a heap: the lowest slot first keeps rows contiguous
        self.queue = AdmissionQueue(opts.max_queue)
        self.running: list[Sequence] = []
        self._cv = threading.Condition()
        self._closing = False
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps: tokens/s
        self._seq_time = 1.0  # EMA of a sequence's time in a slot: the Retry-After estimate

    # -- the handlers' side (any thread) --------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, req: GenRequest) -> None:
        """Queue the request's sequences; QueueFull or ShuttingDown when it cannot wait."""
        with self._cv:
            if self._closing:
                raise ShuttingDown
            self.queue.offer(req.seqs, self.retry_after_s(), len(self._free))
            self.metrics.queue_depth.set(len(self.queue))
            self._cv.notify()

    def cancel(self, req: GenRequest) -> None:
        """The client is gone: its slots are freed before the next step."""
        req.cancelled = True
        with self._cv:
            self._cv.notify()

    def retry_after_s(self) -> float:
        return self._seq_time * (1 + len(self.queue) / self.opts.slots)

    def load(self) -> dict[str, int]:
        with self._cv:
            return {"running": len(self.running), "waiting": len(self.queue), "slots": self.opts.slots}

    def begin_drain(self) -> None:
        """Refuse new requests from now on; the ones in flight run to the end."""
        with self._cv:
            self._closing = True

    def close(self, timeout_s: float) -> bool:
        """Drain (up to `timeout_s`), then stop the thread; True when nothing was left running."""
        self.begin_drain()
        end = time.monotonic() + timeout_s
        with self._cv:
            while (self.running or len(self.queue)) and time.monotonic() < end:
                self._cv.wait(0.05)
            drained = not self.running and not len(self.queue)
            self._stop = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        return drained

    # -- the engine thread -----------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not self._stop and not self.running and not len(self.queue):
                    self._cv.wait()
                if self._stop:
                    return
                now = self.clock()
                dead = list(self.queue.drop_dead(now))
                self._release_over(now)
                admitted = self.queue.pop(len(self._free))
                for s in admitted:
                    s.slot = heapq.heappop(self._free)
                    self.cache.free(s.slot)
                    s.text = self.safety.output_text(IncrementalText(self.decode, s.req.params.stops), self.metrics)
                    self.running.append(s)
                    self.metrics.queue_wait.observe(now - s.req.arrival)
                self.metrics.queue_depth.set(len(self.queue))
                self.metrics.running.set(len(self.running))
                self._cv.notify_all()  # close() waits on this condition too
            for s in dead:
                self._drop(s.req, now)
            if self.running:
                with torch.inference_mode():
                    self._step()

    def _release_over(self, now: float) -> None:
        """Sequences whose request was cancelled, failed or passed its deadline leave their slots."""
        keep = []
        for s in self.running:
            if s.req.over(now):
                self._free_slot(s)
                if not s.cancelled:
                    self._drop(s.req, now)
            else:
                keep.append(s)
        self.running = keep

    def _drop(self, req: GenRequest, now: float) -> None:
        """A request past its deadline: answered 504 once, never late."""
        if req.failed or req.cancelled:
            return
        req.failed = True
        self.metrics.reject("deadline")
        req.sink(("error", 504, "the request passed its deadline before it finished; it was dropped",
                  "deadline_exceeded"))
        self.breaker.record(False, now - req.arrival)  # overload, not a model fault; slowness counts

    def _free_slot(self, s: Sequence) -> None:
        heapq.heappush(self._free, s.slot)
        self.cache.free(s.slot)
        s.slot = -1

    def _step(self) -> None:
        plan = plan_step(self.running, self.opts.max_batch_tokens, self.prefill_chunk)
        if plan.decode:
            self.metrics.batch_size.observe(len(plan.decode))
            self._forward(plan.decode, [[s.out[-1]] for s in plan.decode], 1, decode=True)
        for s, n in plan.prefill:
            if not s.cancelled:
                self._forward([s], [s.prompt[s.fed:s.fed + n]], n)
                self.metrics.prompt_tokens.inc(n)
        self.metrics.step_tokens.observe(plan.tokens)
        with self._cv:
            self.running = [s for s in self.running if s.slot >= 0]
            self.metrics.running.set(len(self.running))

    def _forward(self, seqs: list[Sequence], tokens: list[list[int]], n: int, decode: bool = False) -> None:
        """One forward over `seqs`; a decode step of early-exit requests stops each row at its exit."""
        thresholds = [s.req.params.early_exit_threshold for s in seqs]
        try:
            self.cache.bind([s.slot for s in seqs], n)
            x = torch.tensor(tokens, dtype=torch.long, device=self.cache.device)
            depths = [self.n_layers] * len(seqs)
            if decode and any(t is not None and t < 1 for t in thresholds):
                logits, depths = slot_exit_forward(self.model, x, self.cache, thresholds)
            else:
                logits = self.model(x, cache=self.cache)[:, -1].float()
            if decode:
                for t, d in zip(thresholds, depths, strict=True):
                    if t is not None:
                        self.metrics.exit_tokens.labels(depth=str(d)).inc()
        except Exception:  # noqa: BLE001 (a model fault fails its requests, not the server)
            log.exception("model forward failed for %d sequence(s)", len(seqs))
            for req in {id(s.req): s.req for s in seqs}.values():
                self._fail(req)
            return
        if self.safety.watermark is not None:
            w = self.safety.watermark.config.context_width
            logits = self.safety.bias([s.prompt[-w:] + s.out[-w:] for s in seqs], logits)
        now = self.clock()
        greedy = logits.argmax(dim=-1).tolist()
        produced = 0
        for row, s in enumerate(seqs):
            s.fed += n
            # nothing is sent for a request that is over, its deadline passed during this forward
            # included: the next step's _release_over answers it 504
            if s.prefill_left > 0 or s.req.over(now):
                continue
            p = s.req.params
            tok = greedy[row] if p.temperature == 0 else int(
                sample_next_token(logits[row:row + 1], p.temperature, p.top_k, p.top_p, s.generator)[0])
            produced += 1
            self._push(s, tok, now)
        if produced:
            self.metrics.tokens.inc(produced)
            self._recent.append((now, produced))
            while self._recent and self._recent[0][0] < now - 5.0:
                self._recent.popleft()
            span = max(now - self._recent[0][0], 1e-3) if len(self._recent) > 1 else 1.0
            self.metrics.tokens_per_s.set(sum(k for _, k in self._recent) / span)

    def _push(self, s: Sequence, tok: int, now: float) -> None:
        req = s.req
        if req.first_token_at is None:
            req.first_token_at = now
            self.metrics.ttft.observe(now - req.arrival)
        s.out.append(tok)
        reason = None
        if tok == self.eos_id:
            reason = "stop"
        else:
            assert s.text is not None
            delta = s.text.push(tok)
            if delta:
                req.sink(("delta", s.index, delta))
            if s.text.stopped:
                reason = "content_filter" if s.text.filtered else "stop"
            elif len(s.out) >= req.params.max_tokens or len(s.prompt) + len(s.out) >= self.max_len:
                reason = "length"
        if reason is not None:
            self._finish(s, reason, now)

    def _finish(self, s: Sequence, reason: str, now: float) -> None:
        assert s.text is not None
        rest = s.text.finish()
        if rest:
            s.req.sink(("delta", s.index, rest))
        s.req.sink(("finish", s.index, reason, len(s.out)))
        self._free_slot(s)
        self._seq_time = 0.8 * self._seq_time + 0.2 * (now - s.req.arrival)
        s.req._left -= 1
        if s.req._left == 0:
            latency = now - s.req.arrival
            self.metrics.latency.observe(latency)
            self.metrics.requests.labels(outcome="ok").inc()
            self.breaker.record(False, latency)

    def _fail(self, req: GenRequest) -> None:
        if req.failed:
            return
        req.failed = True
        for s in req.seqs:
            if s.slot >= 0:
                self._free_slot(s)
        self.metrics.requests.labels(outcome="model_error").inc()
        self.breaker.record(True)
        req.sink(("error", 500, "the model failed while generating this request; try again", "model_error"))
