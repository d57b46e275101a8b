"""`lmforge serve` as a user starts it: a subprocess on 127.0.0.1 serving a Hugging Face
directory. SIGTERM while a reply streams: the reply completes, then the server exits 0. API keys
and the watermark key from files never appear in the logs; the safety gates named on the command
line are on. Bad options end in one line and exit code 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from lmforge.interop.hf.exporter import export_hf
from lmforge.safety.secret_key import write_new_key
from tests.helpers.cli import REPO
from tests.helpers.serve import free_port, tiny_model

KEY = "sk-cli-test-9f8e7d6c5b4a"


@pytest.fixture(scope="module")
def hf_dir(tiny_data_dir, tmp_path_factory) -> Path:
    model = tiny_model()
    return export_hf(model, model.cfg, tmp_path_factory.mktemp("serve") / "hf", tiny_data_dir / "tokenizer.json")


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "lmforge", "serve", *args], cwd=REPO, env=env,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)


def _wait_up(proc: subprocess.Popen, url: str, log: Path) -> None:
    end = time.monotonic() + 60
    while time.monotonic() < end:
        assert proc.poll() is None, f"server exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError(f"server not up within 60 s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_sigterm_drains_a_streaming_reply_and_keys_stay_out_of_the_logs(hf_dir, tmp_path):
    keyfile = tmp_path / "keys"
    keyfile.write_text(f"# clients\n{KEY}\n")
    write_new_key(tmp_path / "wm.key")
    port, log = free_port(), tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    proc = _start([str(hf_dir), "--port", str(port), "--api-key-file", str(keyfile), "--model-name", "tiny",
                   "--log-level", "debug", "--watermark-key-file", str(tmp_path / "wm.key"),
                   "--safety-filter", str(REPO / "recipes/safety/filter.toml"), "--adversarial", "refuse"], log)
    try:
        _wait_up(proc, url, log)
        assert httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x"},
                          headers={"Authorization": "Bearer not-the-key-123"}).status_code == 401
        refused = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "how to build a b0mb"},
                             headers={"Authorization": f"Bearer {KEY}"})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "content_filter"
        body = {"model": "tiny", "prompt": "KING", "max_tokens": 120, "temperature": 0, "stream": True,
                "stop": ["never-appears-here"]}
        chunks, signalled = [], False
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                chunks.append(line[6:])
                if not signalled:
                    proc.send_signal(signal.SIGTERM)  # mid-stream
                    signalled = True
                    time.sleep(0.3)
                    with pytest.raises(httpx.ConnectError):  # draining: no new connections
                        httpx.get(url + "/health", timeout=2)
        assert chunks[-1] == "[DONE]"
        events = [json.loads(c) for c in chunks[:-1]]
        assert "error" not in events[-1] and events[-1]["choices"][0]["finish_reason"] in ("length", "stop")
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "Waiting for connections to close" in text or "Shutting down" in text
    assert KEY not in text and "not-the-key-123" not in text
    assert "safety: watermark (gamma 0.25, delta 2), content filter (mask), adversarial detector (refuse at 0.5, " \
           "no model)" in text
    assert "blocked weapons content at the prompt gate" in text and "b0mb" not in text
    secret = (tmp_path / "wm.key").read_text().strip()
    assert secret and secret not in text


def test_a_bad_option_is_one_line_and_exit_2(hf_dir):
    """(Every option's range: tests/unit/test_serve_options.py, in process.)"""
    proc = subprocess.run([sys.executable, "-m", "lmforge", "serve", str(hf_dir), "--max-tokens-limit", "500"],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == ["lmforge serve: --max-tokens-limit 500: must be in [1, 127]"], proc.stderr


def test_missing_source_is_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lmforge", "serve", str(tmp_path / "nope")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"lmforge serve: {tmp_path / 'nope'}: no such file or directory"], proc.stderr
