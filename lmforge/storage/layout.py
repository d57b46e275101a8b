"""Names of what lmforge writes on disk that more than one layer must recognise: a checkpoint
directory (`step-N`, with its manifest) is written by lmforge.checkpoint, and the no-clobber
guard (lmforge.storage.guard) must know one when it sees it without importing the checkpoint
code."""

from __future__ import annotations

import re
from pathlib import Path

MANIFEST = "lmforge-checkpoint.json"  # the file that makes a step-N directory a finished checkpoint
_STEP_RE = re.compile(r"^step-(\d+)(\.tmp)?$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def step_of(path: Path | str) -> int:
    """N of a `step-N` (or unfinished `step-N.tmp`) directory name; -1 when the name is not one."""
    m = _STEP_RE.match(Path(path).name)
    return int(m.group(1)) if m else -1
