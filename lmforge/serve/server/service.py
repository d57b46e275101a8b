"""One request from parsed body to answer: checks against the model and the limits, admission
(breaker, bounded queue), then waiting for the engine's events until the request finishes, the
client leaves or the deadline passes (504: dropped, never answered late)."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from starlette.requests import Request

from lmforge.data.tokenizer import TextTokenizer
from lmforge.models.llama.model import Transformer
from lmforge.serve.server.admission import QueueFull, retry_after_header
from lmforge.serve.server.breaker import STATE_CODE, CircuitBreaker
from lmforge.serve.server.engine import Engine, GenRequest, SamplingParams, ShuttingDown
from lmforge.serve.server.errors import APIError, bad_request
from lmforge.serve.server.feedback import FeedbackStore, Issued, IssuedCompletions
from lmforge.serve.server.guards import ServeSafety
from lmforge.serve.server.metrics import ServerMetrics
from lmforge.serve.server.options import ServerOptions
from lmforge.serve.server.responses import DONE, Shapes, sse, usage
from lmforge.serve.server.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from lmforge.serve.server.text import CHAT_STOP, chat_prompt


class ClientGone(Exception):
    """The client closed the connection: nothing to answer."""


@dataclass
class Prepared:
    """A checked request, ready for the engine."""

    prompts: list[str]
    prompt_ids: list[list[int]]
    n: int
    params: SamplingParams
    deadline_s: float
    chat: bool
    stream: bool
    include_usage: bool
    screened: tuple[str, ...] = ()  # the client's own texts, for the safety screen
    screened_param: str = "prompt"


class Service:
    def __init__(self, model: Transformer, tokenizer: TextTokenizer, opts: ServerOptions,
                 clock: Callable[[], float] = time.monotonic, safety: ServeSafety | None = None):
        self.opts, self.tokenizer, self.clock = opts, tokenizer, clock
        self.safety = safety or ServeSafety()
        self.max_len = model.cfg.max_seq_len
        self.has_exits = bool(model.cfg.early_exit.layers)
        self.metrics = ServerMetrics()
        self.breaker = CircuitBreaker(opts.breaker, clock,
                                      on_change=lambda s: self.metrics.breaker_state.set(STATE_CODE[s]))
        self.engine = Engine(model, tokenizer.decode, tokenizer.eos_id, opts, self.metrics, self.breaker, clock,
                             safety=self.safety)
        self.issued = IssuedCompletions(opts.remember_completions)
        self.feedback = FeedbackStore(opts.feedback_path) if opts.feedback_path else None
        self.draining = False

    def begin_drain(self) -> None:
        self.draining = True
        self.engine.begin_drain()

    # -- checks ------------------------------------------------------------------------------------

    def prepare(self, body: SamplingFields) -> Prepared:
        """The request against the served model and the limits: a 4xx naming the field, or a Prepared."""
        o = self.opts
        if body.model != o.model_name:
            raise APIError(404, f"model '{body.model}' does not exist; this server serves '{o.model_name}'",
                           "invalid_request_error", "model", "model_not_found")
        chat = isinstance(body, ChatCompletionRequest)
        if chat:
            prompts = [chat_prompt([(m.role, m.content) for m in body.messages])]
            where = "messages"
            screened = tuple(m.content for m in body.messages if m.role != "assistant")
        else:
            assert isinstance(body, CompletionRequest)
            prompts, where = body.prompts(), "prompt"
            screened = tuple(prompts)
        if body.n * len(prompts) > o.max_n:
            raise bad_request(f"n x prompts = {body.n * len(prompts)}: this server allows at most {o.max_n} "
                              "choices per request", "n")
        stops = body.stop_list()
        if len(stops) > o.max_stop:
            raise bad_request(f"{len(stops)} stop strings: at most {o.max_stop}", "stop")
        if body.deadline_s is not None and body.deadline_s > o.max_deadline_s:
            raise bad_request(f"deadline_s = {body.deadline_s}: at most {o.max_deadline_s}", "deadline_s")
        ids = [self.tokenizer.encode(p) or [self.tokenizer.eos_id] for p in prompts]
        longest = max(len(x) for x in ids)
        if longest >= self.max_len:
            raise bad_request(f"the {where} is {longest} tokens; this model's context is {self.max_len} tokens "
                              "and at least one must be left to generate", where)
        room = self.max_len - longest
        if body.max_tokens is not None:
            if body.max_tokens > o.max_tokens_limit:
                raise bad_request(f"max_tokens = {body.max_tokens}: this server allows at most "
                                  f"{o.max_tokens_limit}", "max_tokens")
            if body.max_tokens > room:
                raise bad_request(f"max_tokens = {body.max_tokens} + the {where}'s {longest} tokens exceed this "
                                  f"model's context of {self.max_len} tokens", "max_tokens")
            max_tokens = body.max_tokens
        else:
            max_tokens = min(room, o.max_tokens_limit if chat else o.default_max_tokens)
        if body.early_exit_threshold is not None and not self.has_exits:
            raise bad_request("early_exit_threshold: this model has no early exits (model.early_exit.layers is "
                              "empty)", "early_exit_threshold")
        exit_at = body.early_exit_threshold if body.early_exit_threshold is not None else o.early_exit_threshold
        params = SamplingParams(max_tokens=max_tokens, temperature=body.temperature,
                                top_p=body.top_p if body.top_p < 1 else None, top_k=body.top_k, seed=body.seed,
                                stops=tuple(stops) + (CHAT_STOP if chat else ()), early_exit_threshold=exit_at)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if body.stream_options is not None and not body.stream:
            raise bad_request("stream_options is only allowed with stream = true", "stream_options")
        return Prepared(prompts, ids, body.n, params, body.deadline_s or o.default_deadline_s, chat, body.stream,
                        include_usage, screened, where)

    async def screen(self, p: Prepared) -> None:
        """The safety screen of the client's texts (guards.py): an APIError when refused. With the
        detector's perplexity component it runs the model, so off the event loop."""
        if self.safety.screens_with_model:
            await asyncio.to_thread(self.safety.screen, p.screened, p.screened_param, self.metrics)
        else:
            self.safety.screen(p.screened, p.screened_param, self.metrics)

    # -- admission ---------------------------------------------------------------------------------

    def admit(self, p: Prepared, arrival: float) -> tuple[GenRequest, asyncio.Queue]:
        """Into the engine's queue, or 503 (breaker open, draining) / 429 (queue full)."""
        if self.draining:
            self.metrics.reject("shutting_down")
            raise APIError(503, "the server is shutting down", "server_error", None, "shutting_down")
        if not self.breaker.allow():
            self.metrics.reject("breaker_open")
            raise APIError(503, "the server is failing and refuses requests for a while (circuit breaker open)",
                           "server_error", None, "circuit_open", retry_after_header(self.breaker.retry_after()))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def sink(ev: tuple) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, ev)
            except RuntimeError:  # the loop closed (shutdown): nobody is listening any more
                pass

        req = GenRequest(p.prompt_ids, p.n, p.params, arrival + p.deadline_s, sink, arrival)
        try:
            self.engine.submit(req)
        except QueueFull as e:
            self.breaker.release()
            self.metrics.reject("queue_full")
            raise APIError(429, "the server is overloaded (request queue full); retry later", "rate_limit_error",
                           None, "queue_full", retry_after_header(e.retry_after_s)) from None
        except ShuttingDown:
            self.breaker.release()
            self.metrics.reject("shutting_down")
            raise APIError(503, "the server is shutting down", "server_error", None, "shutting_down") from None
        return req, events

    # -- answering ---------------------------------------------------------------------------------

    def _deadline_error(self, req: GenRequest) -> APIError:
        if not req.failed:
            self.metrics.reject("deadline")
        self.engine.cancel(req)
        return APIError(504, "the request passed its deadline before it finished; it was dropped",
                        "timeout_error", "deadline_s", "deadline_exceeded")

    async def _next_events(self, req: GenRequest, events: asyncio.Queue, gone: asyncio.Future) -> list[tuple]:
        """The events that arrived (at least one), or ClientGone, or the 504 of a passed deadline."""
        get = asyncio.ensure_future(events.get())
        done, _ = await asyncio.wait({get, gone}, timeout=max(0.0, req.deadline - self.clock()),
                                     return_when=asyncio.FIRST_COMPLETED)
        if get not in done:
            get.cancel()
            if gone in done:
                self.engine.cancel(req)
                self.breaker.release()
                self.metrics.requests.labels(outcome="client_gone").inc()
                raise ClientGone
            raise self._deadline_error(req)
        out = [get.result()]
        while not events.empty():
            out.append(events.get_nowait())
        return out

    async def complete(self, p: Prepared, req: GenRequest, events: asyncio.Queue, request: Request) -> dict:
        """Wait for every choice; the whole answer, or ClientGone / a 5xx APIError."""
        k = len(req.seqs)
        texts, reasons, counts = [""] * k, [None] * k, [0] * k
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            while any(r is None for r in reasons):
                for ev in await self._next_events(req, events, gone):
                    if ev[0] == "error":
                        raise _event_error(ev)
                    if ev[0] == "delta":
                        texts[ev[1]] += ev[2]
                    else:
                        reasons[ev[1]], counts[ev[1]] = ev[2], ev[3]
        finally:
            gone.cancel()
        if self.clock() > req.deadline:  # finished, but too late to answer
            raise self._deadline_error(req)
        shapes = Shapes(self._new_id(p.chat), self.opts.model_name, p.chat)
        self._remember(shapes.cid, p, texts)
        return shapes.final(texts, reasons, usage(req.prompt_tokens, sum(counts)))

    async def first_events(self, req: GenRequest, events: asyncio.Queue, request: Request) -> list[tuple]:
        """Before a stream starts (and its 200 is sent): the first events, so that an early error
        is still answered with its own status."""
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            evs = await self._next_events(req, events, gone)
        finally:
            gone.cancel()
        if evs[0][0] == "error":
            raise _event_error(evs[0])
        return evs

    async def stream(self, p: Prepared, req: GenRequest, events: asyncio.Queue, first: list[tuple],
                     request: Request) -> AsyncIterator[str]:
        """Server-sent events: a chunk per text delta, a last chunk per choice with its finish
        reason, [DONE]. A client that leaves cancels the request at once (its disconnect is
        watched, not only seen at the next write); a deadline or model error mid-stream ends
        the stream with an error event, never a late chunk."""
        shapes = Shapes(self._new_id(p.chat), self.opts.model_name, p.chat)
        k = len(req.seqs)
        texts, left, counts = [""] * k, k, 0
        finished = False
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            if p.chat:
                for i in range(k):
                    yield sse(shapes.chunk(i, "", role=True))
            batch = first
            while True:
                for ev in batch:
                    if ev[0] == "error":
                        yield sse(_event_error(ev).body())
                        return
                    if ev[0] == "delta":
                        texts[ev[1]] += ev[2]
                        yield sse(shapes.chunk(ev[1], ev[2]))
                    else:
                        left -= 1
                        counts += ev[3]
                        yield sse(shapes.chunk(ev[1], None if p.chat else "", reason=ev[2]))
                if not left:
                    break
                try:
                    batch = await self._next_events(req, events, gone)
                except APIError as e:  # the deadline
                    yield sse(e.body())
                    return
                except ClientGone:
                    return
            finished = True
            if p.include_usage:
                yield sse(shapes.usage_chunk(usage(req.prompt_tokens, counts)))
            yield DONE
            self._remember(shapes.cid, p, texts)
        finally:
            gone.cancel()
            if not finished and not req.failed:
                self.engine.cancel(req)
                self.breaker.release()

    def _new_id(self, chat: bool) -> str:
        return ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)

    def _remember(self, cid: str, p: Prepared, texts: list[str]) -> None:
        self.issued.add(cid, Issued(tuple(p.prompts), tuple(texts), "chat.completion" if p.chat else "text_completion"))


def _event_error(ev: tuple) -> APIError:
    return APIError(ev[1], ev[2], "timeout_error" if ev[1] == 504 else "server_error", None, ev[3])


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
