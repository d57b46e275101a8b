"""A live `lmforge serve` app for tests: a tiny random model with the session's tokenizer, the
real FastAPI app under uvicorn on 127.0.0.1 (a free port) in a thread of the test process, so a
test can reach the service inside (engine, breaker) while it talks HTTP to it."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import uvicorn

from lmforge.config import ModelConfig
from lmforge.data.tokenizer import TextTokenizer
from lmforge.models.llama.model import Transformer, build_model
from lmforge.serve.server.app import build_app
from lmforge.serve.server.guards import ServeSafety
from lmforge.serve.server.options import ServerOptions
from lmforge.serve.server.service import Service

MODEL_NAME = "tiny"


def tiny_model(vocab_size: int = 512, max_seq_len: int = 128, seed: int = 0) -> Transformer:
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, multiple_of=32,
                      max_seq_len=max_seq_len)
    cfg.validate()
    return build_model(cfg, seed=seed).eval()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Live:
    url: str
    service: Service
    server: uvicorn.Server

    def wait_idle(self, timeout: float = 5.0) -> dict:
        """Until no sequence holds a slot or waits; the engine's load then."""
        end = time.monotonic() + timeout
        while True:
            load = self.service.engine.load()
            if (load["running"] == 0 and load["waiting"] == 0) or time.monotonic() > end:
                return load
            time.sleep(0.01)


@contextlib.contextmanager
def live_server(model: Transformer, tokenizer_json: Path, safety: ServeSafety | None = None,
                **options) -> Iterator[Live]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the engine thread: tiny tensors, a shared 2-core machine
    opts = ServerOptions(model_name=MODEL_NAME, **{"max_tokens_limit": model.cfg.max_seq_len - 1, **options})
    opts.check(model.cfg.max_seq_len)
    service = Service(model, TextTokenizer.from_file(tokenizer_json), opts, safety=safety)
    port = free_port()
    config = uvicorn.Config(build_app(service), host="127.0.0.1", port=port, log_level="warning",
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    end = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > end:
            raise AssertionError("the test server did not start")
        time.sleep(0.01)
    try:
        yield Live(f"http://127.0.0.1:{port}", service, server)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        torch.set_num_threads(threads)
