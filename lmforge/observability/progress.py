"""Training progress for humans: a rich bar on a terminal, plain lines in logs, or nothing.

"plain" writes no escape codes at all, so cluster logs and CI captures stay readable; "auto"
picks rich only when the stream is a terminal.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

MODES = ("auto", "rich", "plain", "none")


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def _fmt_count(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def format_metrics(metrics: Mapping[str, Any], step: int | None = None) -> str:
    """The few numbers worth a glance: loss, val loss, lr, tokens/s, MFU. A val loss measured at
    another step than `step` (the last evaluation, kept on display) names its step."""
    parts = []
    if "loss" in metrics:
        parts.append(f"loss {metrics['loss']:.4f}")
    if "val_loss" in metrics:
        at = metrics.get("val_step")
        parts.append(f"val {metrics['val_loss']:.4f}" + (f" (step {at})" if at is not None and at != step else ""))
    if "lr" in metrics:
        parts.append(f"lr {metrics['lr']:.2e}")
    if "tokens_per_s" in metrics:
        parts.append(f"tok/s {_fmt_count(metrics['tokens_per_s'])}")
    if metrics.get("mfu"):
        parts.append(f"mfu {100 * metrics['mfu']:.1f}%")
    return " | ".join(parts)


class ProgressBar:
    """`update(step, metrics)` after each logged step; `close()` (or use as a context manager).

    mode: "rich" (live bar: step/total, loss, lr, tokens/s, elapsed, ETA), "plain" (one text
    line every `plain_every` updates, and at the last step), "none", or "auto" (rich if `file`
    is a terminal, else plain). `file` defaults to sys.stdout at construction.
    """

    def __init__(self, total: int, initial: int = 0, mode: str = "auto", description: str = "train",
                 plain_every: int = 1, file: TextIO | None = None):
        if mode not in MODES:
            raise ValueError(f"progress mode must be one of {', '.join(MODES)}, got {mode!r}")
        if plain_every < 1:
            raise ValueError(f"plain_every must be >= 1, got {plain_every}")
        self.total, self.initial, self.description = total, initial, description
        self.plain_every = plain_every
        self.file = file if file is not None else sys.stdout
        if mode == "auto":
            isatty = getattr(self.file, "isatty", None)
            mode = "rich" if isatty is not None and isatty() else "plain"
        self.mode = mode
        self.step = initial
        self.metrics: dict[str, Any] = {}
        self._updates = 0
        self._printed_at = -1
        self._t0 = time.perf_counter()
        self._progress = None
        self._task = None
        if mode == "rich":
            self._start_rich()

    def _start_rich(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.table import Column

        console = Console(file=self.file)
        fixed = {"table_column": Column(no_wrap=True)}  # step, bar and times are never squeezed
        # Room left for the numbers, cut with an ellipsis on a narrow terminal (rich would wrap).
        used = len(self.description) + 20 + (2 * len(str(self.total)) + 1) + 7 + 3 + 8 + 7
        stats = Column(no_wrap=True, overflow="ellipsis", max_width=max(console.width - used, 8))
        self._progress = Progress(
            TextColumn("[bold]{task.description}", **fixed), BarColumn(bar_width=20, **fixed),
            MofNCompleteColumn(**fixed), TimeElapsedColumn(**fixed), TextColumn("eta", **fixed),
            TimeRemainingColumn(**fixed), TextColumn("{task.fields[stats]}", table_column=stats),
            console=console, transient=False)
        self._progress.start()
        self._task = self._progress.add_task(self.description, total=self.total, completed=self.initial, stats="")

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Record progress at `step`; metrics merge into the last known ones (a val update keeps
        the train loss on display)."""
        self.step = step
        self.metrics.update(metrics or {})
        if metrics and "val_loss" in metrics:
            self.metrics["val_step"] = step
        self._updates += 1
        if self.mode == "rich":
            assert self._progress is not None and self._task is not None
            self._progress.update(self._task, completed=step, stats=format_metrics(self.metrics, step))
        elif self.mode == "plain" and (self._updates % self.plain_every == 0 or step >= self.total):
            self._print_line()

    def line(self) -> str:
        """The plain-text status line for the current state."""
        elapsed = time.perf_counter() - self._t0
        done = self.step - self.initial
        pct = 100.0 * self.step / self.total if self.total else 100.0
        head = f"{self.description} {self.step}/{self.total} ({pct:.1f}%)"
        eta = _fmt_duration((self.total - self.step) * elapsed / done) if done > 0 else "?"
        stats = format_metrics(self.metrics, self.step)
        return " | ".join(p for p in (head, stats, f"elapsed {_fmt_duration(elapsed)}", f"eta {eta}") if p)

    def _print_line(self) -> None:
        print(self.line(), file=self.file, flush=True)
        self._printed_at = self._updates

    def close(self) -> None:
        if self.mode == "rich" and self._progress is not None:
            self._progress.stop()
            self._progress = None
        elif self.mode == "plain" and self._updates and self._printed_at != self._updates:
            self._print_line()  # the last state was not shown yet
        self.mode = "none"

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
