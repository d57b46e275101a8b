"""Sample trace (debug, `train.trace_samples = true`): which samples each rank consumed per step.

`<output_dir>/trace/rank<r>.jsonl`, one line per optimizer step:

    {"step": 5, "rank": 1, "dp_rank": 1, "positions": [...], "windows": [...]}

`positions` are global loader stream positions (a sample's stable id: unique over the run),
`windows` the token windows they map to. A step the stability policy skipped is traced too (its
data was read, not learnt from). A resume or a stability rollback first drops every
line past the step it continues from, so the files always describe the run's effective history.
Ranks with the same `dp_rank` (tensor / pipeline peers) read the same samples: count each dp_rank
once to get the multiset of samples trained on.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lmforge.storage.atomic import write_text_atomic
from lmforge.storage.layout import RunDir


class SampleTracer:
    def __init__(self, run_dir: Path, rank: int, dp_rank: int) -> None:
        self.dir = RunDir(run_dir).trace
        self.path = self.dir / f"rank{rank}.jsonl"
        self.rank, self.dp_rank = rank, dp_rank
        self._positions: list[int] = []
        self._windows: list[int] = []

    def add(self, positions: np.ndarray, windows: np.ndarray) -> None:
        self._positions += [int(v) for v in positions]
        self._windows += [int(v) for v in windows]

    def end_step(self, step: int) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"step": step, "rank": self.rank, "dp_rank": self.dp_rank,
                           "positions": self._positions, "windows": self._windows})
        with open(self.path, "a") as f:
            f.write(line + "\n")
        self._positions, self._windows = [], []

    def discard_step(self) -> None:
        """Forget what was added for a step that is not kept (rolled back)."""
        self._positions, self._windows = [], []


def truncate_traces(run_dir: Path, step: int, paths: list[Path] | None = None) -> None:
    """Keep only lines with step <= `step` in the given trace files (default: all of the run),
    each rewritten to a temp file and renamed."""
    for path in paths if paths is not None else sorted(RunDir(run_dir).trace.glob("rank*.jsonl")):
        if not path.exists():
            continue
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        write_text_atomic(path, "".join(ln + "\n" for ln in keep))


def read_traces(run_dir: Path) -> list[dict]:
    """Every record of every rank's trace file."""
    rows = []
    for path in sorted(RunDir(run_dir).trace.glob("rank*.jsonl")):
        rows += [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return rows
