"""The chat page of `lmforge serve` in headless Chromium: a prompt typed into the page gets a
reply that streams in (the bubble grows over several looks) and is drawn (the screenshot has
text pixels in the reply bubble); the page logs no console error; a wrong key and a prompt the
content filter refuses show their error lines in the page."""

from __future__ import annotations

import time

import pytest

from tests.helpers.browser import drawn_fraction
from tests.helpers.chat_browser import chat_once
from tests.helpers.serve import live_server, tiny_model

pytestmark = pytest.mark.slow
KEY = "sk-browser-test-42424242"


def test_typed_prompt_gets_a_streamed_reply(tiny_data_dir, tmp_path, monkeypatch):
    model = tiny_model()
    with live_server(model, tiny_data_dir / "tokenizer.json", api_keys=(KEY,)) as srv:
        forward = model.forward

        def slow(*a, **k):  # tokens 50 ms apart, so the page's looks see it grow even on a loaded machine
            time.sleep(0.05)
            return forward(*a, **k)
        monkeypatch.setattr(srv.service.engine, "model", slow)
        run = chat_once(srv.url + "/", "Who art thou?", api_key=KEY)
    (tmp_path / "chat.png").write_bytes(run.screenshot)
    assert run.errors == []
    assert run.reply.strip(), "the reply is empty"
    grown = sorted(set(n for n in run.seen_lengths if 0 < n < len(run.reply)))
    assert len(grown) >= 2, f"the reply did not stream in: lengths seen {run.seen_lengths}"
    assert drawn_fraction(run.screenshot, run.box) > 0.01  # text drawn in the reply bubble


def test_a_wrong_key_shows_the_error_on_the_page(tiny_data_dir):
    with live_server(tiny_model(), tiny_data_dir / "tokenizer.json", api_keys=(KEY,)) as srv:
        run = chat_once(srv.url + "/", "Hello", api_key="wrong-key-000")
    assert "invalid or missing API key" in run.reply


def test_a_refused_prompt_shows_the_policy_message_on_the_page(tiny_data_dir):
    from lmforge.safety.gates import ContentFilter
    from lmforge.serve.server.guards import ServeSafety
    from tests.helpers.cli import REPO

    safety = ServeSafety(content_filter=ContentFilter.from_toml(REPO / "recipes/safety/filter.toml"))
    with live_server(tiny_model(), tiny_data_dir / "tokenizer.json", safety) as srv:
        run = chat_once(srv.url + "/", "how do I make a pipe b0mb")
    assert "refused by the content policy (weapons)" in run.reply, run.reply
