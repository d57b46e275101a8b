"""Early exit in `lmforge serve` (issue 17): the server-wide threshold (--early-exit-threshold) and
the per-request `early_exit_threshold` field, against generate() alone, and the exit layers in
/metrics. (The field's bad values and a model without exits: test_serve_api.py's 400 table; the
flag's range and a model without exits: test_serve_options.py.)"""

from __future__ import annotations

import re
from dataclasses import replace

import httpx
import pytest

from lmforge.config.model import EarlyExitConfig
from lmforge.data.tokenizer import TextTokenizer
from lmforge.models.llama.model import build_model
from lmforge.serve.early_exit import ExitPolicy
from lmforge.serve.generate import generate
from tests.helpers.serve import MODEL_NAME, live_server, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    """tests/helpers/serve.py's 2-block model with an exit after block 1."""
    cfg = replace(tiny_model().cfg, early_exit=EarlyExitConfig(layers=[1]))
    return build_model(cfg, seed=0).eval()


@pytest.fixture(scope="module")
def tok(tiny_data_dir):
    return TextTokenizer.from_file(tiny_data_dir / "tokenizer.json")


@pytest.fixture(scope="module")
def live(model, tiny_data_dir):
    with live_server(model, tiny_data_dir / "tokenizer.json", early_exit_threshold=0.0) as srv:
        yield srv


def _complete(live, prompt: str, **extra) -> str:
    r = httpx.post(live.url + "/v1/completions", json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": 12,
                                                       "temperature": 0, **extra}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _alone(model, tok: TextTokenizer, prompt: str, policy: ExitPolicy | None) -> str:
    ids = generate(model, tok.encode(prompt), 12, eos_id=tok.eos_id, early_exit=policy)[0]
    return tok.decode(ids[:-1] if ids and ids[-1] == tok.eos_id else ids)


def _exit_counts(live) -> dict[str, float]:
    text = httpx.get(live.url + "/metrics").text
    return {m[0]: float(m[1]) for m in re.findall(r'lmforge_early_exit_tokens_total\{depth="(\d+)"\} ([0-9.e+]+)', text)}


def test_server_default_and_per_request_thresholds(live, model, tok):
    """Threshold 0 (the server's default here): every decoded token from exit 1, which reads only
    block 0's keys, exact in the server as in generate(); 1 in the request: the full model."""
    before = _exit_counts(live)
    prompt = "And the LORD said"
    exited = _complete(live, prompt)
    assert exited == _alone(model, tok, prompt, ExitPolicy(0.0))
    mid = _exit_counts(live)
    assert mid.get("1", 0) - before.get("1", 0) >= 5 and mid.get("2", 0) == before.get("2", 0)
    full = _complete(live, prompt, early_exit_threshold=1.0)
    assert full == _alone(model, tok, prompt, None) and full != exited
    after = _exit_counts(live)
    assert after.get("2", 0) - mid.get("2", 0) >= 5 and after.get("1", 0) == mid.get("1", 0)


def test_rows_with_different_thresholds_share_a_batch(live, model, tok):
    """Concurrent requests, some exiting and some not, each get what they get alone."""
    import concurrent.futures

    prompts = ["KING HENRY.", "And God", "To be", "The king"]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(_complete, live, p, early_exit_threshold=0.0 if i % 2 else 1.0)
                   for i, p in enumerate(prompts)]
        got = [f.result() for f in futures]
    want = [_alone(model, tok, p, ExitPolicy(0.0) if i % 2 else None) for i, p in enumerate(prompts)]
    assert got == want
