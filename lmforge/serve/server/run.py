"""Running the app under uvicorn with a graceful drain: on the first SIGTERM/SIGINT uvicorn stops
accepting connections and the app refuses new requests on connections already open (503), while
the ones in flight finish, up to `drain_s`; then the engine stops."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

import uvicorn
from fastapi import FastAPI


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_drain: Callable[[], None]):
        super().__init__(config)
        self._on_drain = on_drain

    def handle_exit(self, sig, frame) -> None:  # noqa: ANN001 (signal handler signature)
        self._on_drain()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """As uvicorn's, less its re-raising of the signal at the end: a drained server exits 0."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def serve_app(app: FastAPI, host: str, port: int, drain_s: float, on_drain: Callable[[], None],
              log_level: str = "info", access_log: bool = True) -> None:
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                            timeout_graceful_shutdown=max(1, round(drain_s)), server_header=False)
    DrainingServer(config, on_drain).run()
