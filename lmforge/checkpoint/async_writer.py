"""The background half of an async checkpoint save: one writer thread that first copies the state
into reused host buffers, then runs the manager's write (DCP, publish, prune).

Why apart from the manager: this is the threading (when may training change the tensors again,
who waits for what) and nothing about checkpoints; the manager decides what a write does.
The copy overlaps the next forward/backward; the optimizers of the saved state get a step
pre-hook that waits until the copy is done, since their step is what changes the tensors in place.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from lmforge.checkpoint.dcp_io import copy_to_host, host_buffers_like
from lmforge.checkpoint.state import ModelOptimizerState

__all__ = ["AsyncWriter"]

FlatWrite = Callable[[dict[str, Any]], None]  # writes a flat state snapshot (the manager's save)


class AsyncWriter:
    """One save at a time in a writer thread. Not collective itself: every rank has its own, and
    the writes it runs are the collective part."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None  # the save being written in the background
        self._staging: dict[str, Any] | None = None  # reused host buffers
        self._staged: threading.Event | None = None  # set once the save in progress copied the state
        self._stall_rec: dict[str, float] | None = None  # its record: wait_staged adds to "stall_s"
        self._hooks: dict[int, Any] = {}  # id(optimizer) -> step pre-hook handle

    def hook_optimizers(self, state: Mapping[str, Any]) -> None:
        """Make the optimizer of each ModelOptimizerState in `state` wait for the copy before it steps."""
        for obj in state.values():
            opt = getattr(obj, "optimizer", None) if isinstance(obj, ModelOptimizerState) else None
            if opt is not None and id(opt) not in self._hooks:
                self._hooks[id(opt)] = opt.register_step_pre_hook(lambda *_: self.wait_staged())

    def submit(self, flat: dict[str, Any], rec: dict[str, float], write: FlatWrite) -> None:
        """In the writer thread: copy the tensors of `flat` to host buffers, then `write` the copy.
        The caller waited for the previous save (`wait`) first; `rec` is this save's record."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmforge-ckpt")
        self._staged, self._stall_rec = threading.Event(), rec
        self._pending = self._executor.submit(self._stage_and_write, flat, write, self._staged)

    def _stage_and_write(self, flat: dict[str, Any], write: FlatWrite, staged: threading.Event) -> None:
        try:
            if self._staging is None or self._staging.keys() != flat.keys():
                self._staging = host_buffers_like(flat)
            flat = copy_to_host(flat, self._staging)
        finally:
            staged.set()
        write(flat)

    def wait_staged(self) -> None:
        """Block until the save in progress has copied the state (then it may change); the time
        waited counts as that save's stall."""
        event, rec = self._staged, self._stall_rec
        self._staged = None
        if event is not None and not event.is_set():
            t0 = time.perf_counter()
            event.wait()
            if rec is not None:
                rec["stall_s"] = rec.get("stall_s", 0.0) + time.perf_counter() - t0

    def wait(self) -> None:
        """Block until the save in progress (if any) is written; re-raise its error."""
        self.wait_staged()
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Wait for the save in progress, stop the thread, free the buffers, remove the hooks."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            self._staging = None
            for handle in self._hooks.values():
                handle.remove()
            self._hooks.clear()
