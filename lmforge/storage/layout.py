"""Names of what lmforge writes on disk that more than one layer must recognise: a checkpoint
directory (`step-N`, with its manifest) is written by lmforge.checkpoint, and the no-clobber
guard (lmforge.storage.guard) must know one when it sees it without importing the checkpoint
code; a run directory's files are named by `RunDir`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "lmforge-checkpoint.json"  # the file that makes a step-N directory a finished checkpoint
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index, in every checkpoint directory
_STEP_RE = re.compile(r"^step-(\d+)(\.tmp)?$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def holds_checkpoint(path: Path | str) -> bool:
    """Whether `path` holds a checkpoint's files: lmforge's manifest, or DCP's index alone (a
    checkpoint written by torch.distributed.checkpoint without lmforge)."""
    path = Path(path)
    return (path / MANIFEST).is_file() or (path / DCP_METADATA).is_file()


def step_of(path: Path | str) -> int:
    """N of a `step-N` (or unfinished `step-N.tmp`) directory name; -1 when the name is not one."""
    m = _STEP_RE.match(Path(path).name)
    return int(m.group(1)) if m else -1


@dataclass(frozen=True)
class RunDir:
    """The layout of a training run's directory (`train.output_dir`), in one place: every writer and
    reader of a run asks this object for its paths instead of joining names itself."""

    root: Path
    checkpoint_folder: str = "checkpoints"  # `checkpoint.folder`

    CONFIG = "config.json"
    TOKENIZER = "tokenizer.json"
    METRICS = "metrics.jsonl"
    TENSORBOARD = "tb"
    MEMORY = "memory"
    TRACE = "trace"
    LOSS_PLOT = "loss.png"
    # What a run writes besides its checkpoints; any of these marks an earlier run.
    RUN_FILES = (CONFIG, METRICS, TOKENIZER, MEMORY, TRACE, LOSS_PLOT)

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / self.CONFIG

    @property
    def tokenizer(self) -> Path:
        return self.root / self.TOKENIZER

    @property
    def metrics(self) -> Path:
        return self.root / self.METRICS

    @property
    def tensorboard(self) -> Path:
        return self.root / self.TENSORBOARD

    @property
    def trace(self) -> Path:
        return self.root / self.TRACE

    @property
    def loss_plot(self) -> Path:
        return self.root / self.LOSS_PLOT

    @property
    def checkpoints(self) -> Path:
        return self.root / self.checkpoint_folder

    def memory_report(self, rank: int) -> Path:
        return self.root / self.MEMORY / f"rank{rank}.json"
