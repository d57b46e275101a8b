"""What the by-hand benchmarks that start from the main job's run share: where its data is, and
`lmforge` called in this process as a user would call it."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path


def main_run_data(run: Path, given: Path | None,
                  how_to_train: str = "train the main job first (bash scripts/run_default.sh)") -> Path | None:
    """The data dir of the run at `run` (by default the main job's); None (after one line on stderr,
    with `how_to_train`) when there is no run."""
    if not (run / "config.json").is_file():
        print(f"no run at {run}: {how_to_train} or pass --run", file=sys.stderr)
        return None
    return data_dir_of(run, given)


def data_dir_of(run: Path, given: Path | None) -> Path:
    """--data-dir, else the run's data.dir as given (relative: from here, then from the run's repo root)."""
    if given is not None:
        return given.resolve()
    d = Path(json.loads((run / "config.json").read_text())["data"]["dir"])
    for cand in (d, run.resolve().parent.parent / d):
        if cand.is_dir():
            return cand.resolve()
    raise SystemExit(f"the run's data.dir {d} is not found from here nor from {run.resolve().parent.parent}; "
                     "pass --data-dir")


def lmforge(argv: list[str]) -> str:
    """`lmforge ARGV` in process; its stdout (SystemExit with the output on a failure)."""
    from lmforge.cli import main

    printed, errors = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
        code = main(argv)
    if code != 0:
        raise SystemExit(f"lmforge {' '.join(argv)} failed ({code}):\n{printed.getvalue()[-2000:]}"
                         f"{errors.getvalue()[-2000:]}")
    return printed.getvalue()
