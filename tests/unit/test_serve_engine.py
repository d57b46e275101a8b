"""The serving engine's parts without HTTP: the per-slot KV cache against generate(), the
scheduler's token budget, stop strings, deadlines, the circuit breaker's states, the feedback file."""

from __future__ import annotations

import json
import random

import pytest
import torch

from lmforge.serve.generate import generate
from lmforge.serve.server.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from lmforge.serve.server.feedback import FeedbackStore, read_records
from lmforge.serve.server.options import BreakerOptions
from lmforge.serve.server.scheduler import plan_step
from lmforge.serve.server.text import IncrementalText
from tests.helpers.serve import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@torch.inference_mode()
def test_slot_cache_joins_and_leaves_equal_generate_alone():
    """Sequences prefilled in chunks, joining and leaving a running batch at different steps,
    give exactly generate()'s greedy tokens for each prompt alone."""
    model = tiny_model()
    rng = random.Random(0)
    prompts = [[rng.randrange(512) for _ in range(rng.randint(1, 20))] for _ in range(6)]
    want = [generate(model, p, 15)[0] for p in prompts]
    cache = model.new_slot_cache(4, 128)
    got: dict[int, list[int]] = {}
    slot_of: dict[int, int] = {}
    pending = list(range(len(prompts)))
    free = [0, 1, 2, 3]
    while pending or slot_of:
        while pending and free:  # join: prefill in chunks of 7 tokens
            i, s = pending.pop(0), free.pop(0)
            p = prompts[i]
            for a in range(0, len(p), 7):
                cache.bind([s], len(p[a:a + 7]))
                logits = model(torch.tensor([p[a:a + 7]]), cache=cache)[:, -1]
            got[i], slot_of[i] = [int(logits.argmax())], s
        rows = list(slot_of)
        cache.bind([slot_of[i] for i in rows], 1)
        logits = model(torch.tensor([[got[i][-1]] for i in rows]), cache=cache)[:, -1]
        for r, i in enumerate(rows):
            got[i].append(int(logits[r].argmax()))
            if len(got[i]) == 15:  # leave: the slot starts over for the next prompt
                cache.free(slot_of[i])
                free.append(slot_of.pop(i))
    assert [got[i] for i in range(len(prompts))] == want


def test_slot_cache_refuses_overflow_and_bad_rows():
    cache = tiny_model().new_slot_cache(2, 8)
    with pytest.raises(ValueError, match="overflow"):
        cache.bind([0], 9)
    with pytest.raises(ValueError, match="distinct"):
        cache.bind([1, 1], 1)


class _Seq:
    def __init__(self, left: int):
        self.prefill_left = left


def test_scheduler_decodes_first_then_prefills_under_the_budget():
    running = [_Seq(0), _Seq(100), _Seq(0), _Seq(5), _Seq(30)]
    plan = plan_step(running, budget=40, chunk=32)
    assert plan.decode == [running[0], running[2]]
    assert [(running.index(s), n) for s, n in plan.prefill] == [(1, 32), (3, 5), (4, 1)]
    assert plan.tokens == 40


@pytest.mark.parametrize(("pieces", "stops", "deltas", "text"), [
    (["Hel", "lo\nUs", "er: hi"], ["\nUser:"], ["Hel", "lo", ""], "Hello"),
    (["ab", "c", "d"], ["cx"], ["ab", "", "cd"], "abcd"),
    (["x", "\ufffd", "é"], [], ["x", "", "é"], "xé"),
])
def test_incremental_text_holds_back_partial_stops_and_characters(pieces, stops, deltas, text):
    """Each id stands for the text so far (`pieces` joined); a stop string is cut off, its
    prefixes and half characters are held back until they resolve."""
    def decode(ids: list[int]) -> str:
        joined = "".join(pieces[:len(ids)])
        return joined.replace("\ufffdé", "é")  # the second byte completes the character

    t = IncrementalText(decode, stops)
    out = [t.push(i) for i in range(len(pieces))]
    out[-1] += t.finish()
    assert out == deltas and "".join(out) == text == t.text


def test_breaker_opens_half_opens_and_closes():
    now = [0.0]
    b = CircuitBreaker(BreakerOptions(error_rate=0.5, window=4, min_requests=4, cooldown_s=10, probes=2),
                       clock=lambda: now[0])
    for failed in (False, True, False):
        b.record(failed)
    assert b.state == CLOSED and b.allow()
    b.record(True)  # 2 of 4 failed
    assert b.state == OPEN and not b.allow() and b.retry_after() == 10
    now[0] = 10.0
    assert b.state == HALF_OPEN
    assert b.allow() and b.allow() and not b.allow()  # two probes, no third
    b.record(False)
    b.record(True)  # a probe failed: open again for a full cool-down
    assert b.state == OPEN and b.retry_after() == 10
    now[0] = 20.0
    assert b.allow() and b.allow()
    b.record(False)
    b.record(False)
    assert b.state == CLOSED and b.allow()


def test_breaker_probes_that_never_reach_the_model_do_not_wedge_it():
    now = [0.0]
    b = CircuitBreaker(BreakerOptions(error_rate=1.0, window=1, min_requests=1, cooldown_s=1, probes=1, slow_s=5),
                       clock=lambda: now[0])
    b.record(True)
    now[0] = 1.0
    assert b.allow() and not b.allow()
    b.release()  # e.g. the queue was full: another probe may go
    assert b.allow()
    now[0] = 7.0  # that probe never answered within slow_s: a failure
    assert b.state == OPEN


def test_breaker_counts_slow_answers_as_failures():
    b = CircuitBreaker(BreakerOptions(error_rate=1.0, window=2, min_requests=2, slow_s=1.0))
    b.record(False, latency_s=2.0)
    b.record(False, latency_s=3.0)
    assert b.state == OPEN


def test_feedback_store_appends_and_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "fb" / "feedback.jsonl"
    store = FeedbackStore(path)
    store.append({"id": "a", "rating": 1})
    with open(path, "ab") as f:  # a crash in the middle of the next write
        f.write(b'{"id": "b", "rat')
    assert read_records(path) == [{"id": "a", "rating": 1}]
    store.append({"id": "c", "rating": -1})  # the torn record is cut, never glued to this one
    assert read_records(path) == [{"id": "a", "rating": 1}, {"id": "c", "rating": -1}]
    assert [json.loads(ln)["id"] for ln in path.read_text().splitlines()] == ["a", "c"]


def test_a_token_made_after_the_deadline_is_not_sent_the_request_is_dropped():
    """The engine itself never finishes a request late: a forward that ends past the deadline
    (a fake clock moved by the model) gives a 504 event, not the token and a finish."""
    import threading

    from lmforge.serve.server.engine import Engine, GenRequest, SamplingParams
    from lmforge.serve.server.metrics import ServerMetrics
    from lmforge.serve.server.options import ServerOptions

    model = tiny_model()
    now = [0.0]
    forward = model.forward

    def slow_forward(*a, **k):
        now[0] += 1.0  # each forward takes one (fake) second
        return forward(*a, **k)

    opts = ServerOptions(model_name="t", max_tokens_limit=model.cfg.max_seq_len - 1)
    metrics = ServerMetrics()
    breaker = CircuitBreaker(BreakerOptions(), lambda: now[0])
    engine = Engine(model, lambda ids: "x" * len(ids), None, opts, metrics, breaker, clock=lambda: now[0])
    engine.model = slow_forward
    events, done = [], threading.Event()

    def sink(ev):
        events.append(ev)
        if ev[0] in ("error", "finish"):
            done.set()

    engine.start()
    try:
        on_time = GenRequest([[1, 2, 3]], 1, SamplingParams(max_tokens=1), 1.5, sink, 0.0)  # forward ends at 1
        engine.submit(on_time)
        assert done.wait(30)
        assert events[-1][0] == "finish"
        events.clear()
        done.clear()
        late = GenRequest([[1, 2, 3]], 1, SamplingParams(max_tokens=1), now[0] + 0.5, sink, now[0])
        engine.submit(late)
        assert done.wait(30)
    finally:
        engine.close(5)
    assert [e[0] for e in events] == ["error"] and events[0][1] == 504
    ok = metrics.registry.get_sample_value("lmforge_requests_total", {"outcome": "ok"})
    assert ok == 1  # the late one is not counted as answered
