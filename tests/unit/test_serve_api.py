"""`lmforge serve`'s HTTP API against a live server on 127.0.0.1: the official `openai` client
(streaming and not, every sampling parameter), OpenAI's error shape with the field named, 16
concurrent greedy requests equal to generate() alone, the bounded queue (429), deadlines (504),
the circuit breaker under injected model errors, client disconnects, API keys, size limits,
/metrics and feedback."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest

from lmforge.data.tokenizer import TextTokenizer
from lmforge.serve.generate import generate
from lmforge.serve.server.feedback import read_records
from tests.helpers.serve import MODEL_NAME, live_server, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
KEY = "sk-test-0123456789abcdef"


@pytest.fixture(scope="module")
def tok_path(tiny_data_dir):
    return tiny_data_dir / "tokenizer.json"


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def live(model, tok_path, tmp_path_factory):
    fb = tmp_path_factory.mktemp("fb") / "feedback.jsonl"
    with live_server(model, tok_path, api_keys=(KEY,), feedback_path=fb, max_request_bytes=4096,
                     max_n=4) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0)


def _alone(model, tok: TextTokenizer, prompt: str, max_tokens: int) -> str:
    ids = generate(model, tok.encode(prompt), max_tokens, eos_id=tok.eos_id)[0]
    return tok.decode(ids[:-1] if ids and ids[-1] == tok.eos_id else ids)


def test_completion_and_chat_with_the_openai_client(client, model, tok_path):
    tok = TextTokenizer.from_file(tok_path)
    r = client.completions.create(model=MODEL_NAME, prompt="KING HENRY.", max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text == _alone(model, tok, "KING HENRY.", 12)
    assert r.usage.prompt_tokens == len(tok.encode("KING HENRY.")) and 1 <= r.usage.completion_tokens <= 12
    assert r.choices[0].finish_reason in ("length", "stop")

    chat = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Speak."}],
                                          max_tokens=10, temperature=0)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == _alone(model, tok, "User: Speak.\nAssistant:", 10).split("\nUser:")[0]
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]


def test_streaming_equals_non_streaming(client):
    kw = dict(model=MODEL_NAME, prompt="And the LORD said", max_tokens=20, temperature=0)
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].usage.completion_tokens >= 1 and sum(1 for c in chunks if c.choices) >= 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    chat_kw = dict(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=15, temperature=0)
    whole = client.chat.completions.create(**chat_kw).choices[0].message.content
    parts = list(client.chat.completions.create(**chat_kw, stream=True))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == whole


def test_sampling_parameters(client):
    base = dict(model=MODEL_NAME, prompt="KING", max_tokens=24)
    a = client.completions.create(**base, temperature=1.0, top_p=0.9, seed=7, n=3, extra_body={"top_k": 50})
    b = client.completions.create(**base, temperature=1.0, top_p=0.9, seed=7, n=3, extra_body={"top_k": 50})
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seed: reproducible
    assert len({c.text for c in a.choices}) > 1  # n: three different samples
    assert [c.index for c in a.choices] == [0, 1, 2]
    top1 = client.completions.create(**base, temperature=1.0, seed=1, extra_body={"top_k": 1}).choices[0].text
    greedy = client.completions.create(**base, temperature=0).choices[0].text
    assert top1 == greedy  # top_k = 1 is greedy whatever the temperature
    tiny_p = client.completions.create(**base, temperature=1.5, top_p=1e-6, seed=3).choices[0].text
    assert tiny_p == greedy  # the nucleus keeps only the most likely token
    short = client.completions.create(**{**base, "max_tokens": 3}, temperature=0)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    stop = greedy[3:6]
    cut = client.completions.create(**base, temperature=0, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == greedy[:greedy.index(stop)]


def test_sixteen_concurrent_greedy_requests_equal_each_alone(live, model, tok_path):
    tok = TextTokenizer.from_file(tok_path)
    prompts = [f"{w} {i}" for i, w in enumerate(["KING", "And the", "Then", "O", "LORD", "What"] * 3)][:16]
    want = [_alone(model, tok, p, 24) for p in prompts]

    async def run() -> list[str]:
        async with httpx.AsyncClient(base_url=live.url, headers={"Authorization": f"Bearer {KEY}"},
                                     timeout=60) as c:
            rs = await asyncio.gather(*[c.post("/v1/completions", json={
                "model": MODEL_NAME, "prompt": p, "max_tokens": 24, "temperature": 0}) for p in prompts])
        return [r.json()["choices"][0]["text"] for r in rs]

    def steps(le: str) -> float:  # decode steps so far with at most `le` sequences
        return next(x.value for x in live.service.metrics.batch_size.collect()[0].samples
                    if x.name == "lmforge_batch_size_bucket" and x.labels["le"] == le)

    before = steps("8.0"), steps("+Inf")
    assert asyncio.run(run()) == want
    big = (steps("+Inf") - before[1]) - (steps("8.0") - before[0])
    assert big > 0  # they really ran together: decode steps with more than 8 sequences were taken


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_k": 0}, "top_k"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 500}, "max_tokens"),
    ({"prompt": "x", "n": 9}, "n"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "x", "seed": "s"}, "seed"),
    ({"prompt": "x", "logprobs": 2}, "logprobs"),
    ({"prompt": "x", "bogus": 1}, "bogus"),
    ({"prompt": "x", "early_exit_threshold": -0.5}, "early_exit_threshold"),
    ({"prompt": "x", "early_exit_threshold": 0.5}, "early_exit_threshold"),  # this model has no exits
    ({}, "prompt"),
    ({"prompt": "x " * 200}, "prompt"),
])
def test_bad_parameters_are_400_naming_the_field(live, body, param):
    r = httpx.post(live.url + "/v1/completions", json={"model": MODEL_NAME, **body},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and param in err["message"]
    assert "Traceback" not in r.text


def test_keys_sizes_models_and_error_shapes(live):
    url = live.url + "/v1/completions"
    ok = {"model": MODEL_NAME, "prompt": "x", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong-key-123"}, {"Authorization": f"Basic {KEY}"}):
        r = httpx.post(url, json=ok, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(url, json={**ok, "prompt": "y" * 5000}, headers=auth)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():
        yield b'{"model": "tiny", "prompt": "'
        yield b"z" * 5000
        yield b'"}'
    r = httpx.post(url, content=chunked(), headers={**auth, "Content-Type": "application/json"})
    assert r.status_code == 413  # no Content-Length: counted while it streams in
    r = httpx.post(url, json={**ok, "model": "gpt-4"}, headers=auth)
    assert r.status_code == 404 and r.json()["error"] == {
        "message": "model 'gpt-4' does not exist; this server serves 'tiny'", "type": "invalid_request_error",
        "param": "model", "code": "model_not_found"}
    r = httpx.post(url, content=b"{not json", headers=auth)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    assert httpx.get(live.url + "/v1/nothing", headers=auth).status_code == 404


def test_queue_full_is_429_with_retry_after(model, tok_path):
    with live_server(model, tok_path, slots=1, max_batch_tokens=8, max_queue=1) as srv:
        async def run():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
                return await asyncio.gather(*[c.post("/v1/completions", json={
                    "model": MODEL_NAME, "prompt": "KING", "max_tokens": 60, "temperature": 0}) for _ in range(6)])
        rs = asyncio.run(run())
        codes = sorted(r.status_code for r in rs)
        assert codes.count(200) >= 2 and codes.count(429) >= 1 and set(codes) <= {200, 429}
        shed = next(r for r in rs if r.status_code == 429)
        assert int(shed.headers["Retry-After"]) >= 1 and shed.json()["error"]["type"] == "rate_limit_error"
        text = httpx.get(srv.url + "/metrics").text
        assert f'lmforge_rejections_total{{reason="queue_full"}} {codes.count(429)}.0' in text


def _slow(model, seconds: float):
    """The model, each forward `seconds` slower."""
    forward = model.forward

    def slow_forward(*a, **k):
        time.sleep(seconds)
        return forward(*a, **k)
    return slow_forward


@pytest.mark.timed
def test_deadline_drops_the_request_never_answers_late(model, tok_path, monkeypatch):
    with live_server(model, tok_path) as srv:
        monkeypatch.setattr(srv.service.engine, "model", _slow(model, 0.03))  # 100 tokens: > 3 s
        # greedy: the model writes all 100 tokens from this prompt; a sampled reply can stop at its
        # end-of-text within the deadline (one in a few hundred reached 10 tokens) and be answered 200
        greedy = {"model": MODEL_NAME, "prompt": "KING", "max_tokens": 100, "temperature": 0}
        t0 = time.monotonic()
        r = httpx.post(srv.url + "/v1/completions", json={**greedy, "deadline_s": 0.3}, timeout=30)
        took = time.monotonic() - t0
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
        assert 0.3 <= took < 1.5
        assert srv.wait_idle()["running"] == 0  # its slot was freed
        with httpx.stream("POST", srv.url + "/v1/completions", timeout=30, json={**greedy, "deadline_s": 0.4, "stream": True}) as s:
            lines = [ln for ln in s.iter_lines() if ln.startswith("data:")]
        assert json.loads(lines[-1][5:])["error"]["code"] == "deadline_exceeded"  # ended, never late
        assert "data: [DONE]" not in lines


def test_breaker_opens_on_model_errors_half_opens_and_recovers(model, tok_path, monkeypatch):
    from lmforge.serve.server.options import BreakerOptions

    with live_server(model, tok_path, breaker=BreakerOptions(error_rate=0.5, window=4, min_requests=4,
                                                             cooldown_s=0.5, probes=2)) as srv:
        broken = [True]
        forward = model.forward

        def faulty(*a, **k):
            if broken[0]:
                raise RuntimeError("injected fault")
            return forward(*a, **k)
        monkeypatch.setattr(srv.service.engine, "model", faulty)
        body = {"model": MODEL_NAME, "prompt": "KING", "max_tokens": 4}
        codes = [httpx.post(srv.url + "/v1/completions", json=body).status_code for _ in range(4)]
        assert codes == [500] * 4
        r = httpx.post(srv.url + "/v1/completions", json=body)
        assert r.status_code == 503 and r.json()["error"]["code"] == "circuit_open" and "Retry-After" in r.headers
        assert "injected fault" not in r.text and "Traceback" not in r.text
        assert "lmforge_breaker_state 2.0" in httpx.get(srv.url + "/metrics").text
        broken[0] = False  # the fault is fixed; after the cool-down the probes get through
        time.sleep(0.6)
        assert httpx.get(srv.url + "/health").json()["breaker"] == "half_open"
        assert [httpx.post(srv.url + "/v1/completions", json=body).status_code for _ in range(3)] == [200] * 3
        assert httpx.get(srv.url + "/health").json()["breaker"] == "closed"
        assert "lmforge_breaker_state 0.0" in httpx.get(srv.url + "/metrics").text


@pytest.mark.timed
@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_frees_the_slot_at_once(model, tok_path, monkeypatch, stream):
    with live_server(model, tok_path) as srv:
        monkeypatch.setattr(srv.service.engine, "model", _slow(model, 0.02))
        body = {"model": MODEL_NAME, "prompt": "KING", "max_tokens": 120, "stream": stream}

        def leave():
            try:
                with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=0.3) as r:
                    for _ in r.iter_lines():
                        break
            except httpx.TimeoutException:
                pass
        t = threading.Thread(target=leave)
        t.start()
        end = time.monotonic() + 5
        while srv.service.engine.load()["running"] == 0 and time.monotonic() < end:
            time.sleep(0.005)
        assert srv.service.engine.load()["running"] == 1
        t.join()
        gone_at = time.monotonic()
        load = srv.wait_idle(timeout=5)
        assert load["running"] == 0 and time.monotonic() - gone_at < 1.0  # 120 tokens would take > 2.4 s


def test_metrics_report_the_serving_figures(live, client):
    client.completions.create(model=MODEL_NAME, prompt="KING", max_tokens=5, temperature=0)
    text = httpx.get(live.url + "/metrics").text
    for name in ("lmforge_queue_depth", "lmforge_batch_size_bucket", "lmforge_tokens_per_second",
                 "lmforge_time_to_first_token_seconds_bucket", "lmforge_request_latency_seconds_bucket",
                 'lmforge_rejections_total{reason="unauthorized"}', "lmforge_breaker_state",
                 "lmforge_generated_tokens_total"):
        assert name in text, name
    generated = next(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith("lmforge_generated_tokens_total"))
    assert generated >= 5


def test_feedback_is_stored_for_issued_ids_only(live, client):
    r = client.completions.create(model=MODEL_NAME, prompt="KING", max_tokens=6, n=2, temperature=1.0, seed=2)
    auth = {"Authorization": f"Bearer {KEY}"}
    url = live.url + "/v1/feedback"
    assert httpx.post(url, json={"id": r.id, "preferred_choice": 1}, headers=auth).status_code == 200
    assert httpx.post(url, json={"id": r.id, "rating": -1, "choice": 0}, headers=auth).status_code == 200
    bad = httpx.post(url, json={"id": "cmpl-never", "rating": 1}, headers=auth)
    assert bad.status_code == 404 and bad.json()["error"]["param"] == "id"
    both = httpx.post(url, json={"id": r.id, "rating": 1, "preferred_choice": 0}, headers=auth)
    assert both.status_code == 400
    assert httpx.post(url, json={"id": r.id, "rating": 3}, headers=auth).json()["error"]["param"] == "rating"
    assert httpx.post(url, json={"id": r.id, "rating": 1}).status_code == 401
    recs = read_records(live.service.opts.feedback_path)
    assert recs[-2]["chosen"] == r.choices[1].text and recs[-2]["rejected"] == [r.choices[0].text]
    assert recs[-2]["prompts"] == ["KING"] and recs[-1]["rating"] == -1
    assert recs[-1]["completion"] == r.choices[0].text


def test_no_stack_trace_on_an_internal_error(live, monkeypatch):
    def boom(body):
        raise KeyError("secret internals")
    monkeypatch.setattr(live.service, "prepare", boom)
    r = httpx.post(live.url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "x"},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    assert "secret" not in r.text and "Traceback" not in r.text

