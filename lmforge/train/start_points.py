"""What a run starts from (`train.init_from`, `checkpoint.resume PATH`), read from the paths and
their marker files alone: no torch here.

`lmforge train|distill` answers a path that is missing or of the wrong kind (an init_from that is
neither a run directory nor a checkpoint step directory or lies inside the new run's directory; a
resume path that is no checkpoint step directory) before torch and the checkpoint stack load
(~0.3 s instead of ~3.5 s on 2 cores). The checkpoint itself (its manifest, files, tensor shapes)
is checked later: `continual.check_init_from`, which classifies through `init_from_kind` too, and
`CheckpointManager.resolve_resume`.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.config import ConfigError
from lmforge.storage.layout import MANIFEST, holds_checkpoint
from lmforge.storage.model_dir import ModelDirError, model_dir_kind

__all__ = ["check_init_from_path", "check_resume_path", "init_from_kind", "refuse_inside_output_dir"]


def init_from_kind(spec: str) -> str:
    """"checkpoint" (a step directory: lmforge's manifest or DCP's index) or "run" (an lmforge run
    directory: its newest valid checkpoint is taken); ConfigError in one line otherwise, naming a
    Hugging Face or quantized directory as such."""
    path = Path(spec)
    if not path.is_dir():
        raise ConfigError("train.init_from", spec, "no such directory; pass a run directory (its newest valid "
                          "checkpoint) or a checkpoint step directory (<run>/checkpoints/step-N)")
    if holds_checkpoint(path):
        return "checkpoint"
    try:
        kind = model_dir_kind(path)  # the one definition of each kind (storage/model_dir.py)
    except ModelDirError:
        kind = ""
    if kind == "run":
        return "run"
    if kind == "hf":  # it has a config.json too: it once passed for a run and failed after torch loaded
        raise ConfigError("train.init_from", spec, "is a Hugging Face directory; import it first "
                          f"(lmforge import {spec} RUN_DIR) and start from that run")
    if kind == "quantized":
        raise ConfigError("train.init_from", spec, "is a quantized directory; start from the run it was "
                          "quantized from")
    raise ConfigError("train.init_from", spec, "is neither a run directory (no config.json with a model table) "
                      f"nor a checkpoint step directory (no {MANIFEST})")


def refuse_inside_output_dir(spec: str, path: Path | str, output_dir: str) -> None:
    """ConfigError when `path` (what `spec` names, or the checkpoint it resolves to) lies inside
    this run's output directory: --overwrite would clear it, a new run there would replace it."""
    out = Path(output_dir).resolve()
    if Path(path).resolve().is_relative_to(out):
        raise ConfigError("train.init_from", spec, f"is inside train.output_dir ({out}): a new run there would "
                          "replace it; write the new run to another directory (or resume with "
                          "--checkpoint.resume auto)")


def check_init_from_path(init_from: str, output_dir: str) -> None:
    """The path checks of `train.init_from` (nothing when it is empty), before torch is imported."""
    if init_from:
        init_from_kind(init_from)
        refuse_inside_output_dir(init_from, init_from, output_dir)


def check_resume_path(resume: str) -> None:
    """`checkpoint.resume` other than "none" / "auto": an existing checkpoint step directory
    (lmforge's manifest or DCP's index; whether it is valid is `CheckpointManager`'s to say)."""
    spec = resume.strip()
    if spec.lower() in ("none", "auto"):
        return
    path = Path(spec).expanduser()
    expected = "expected a checkpoint step directory (<run>/checkpoints/step-N), 'auto' or 'none'"
    if not path.is_dir():
        raise ConfigError("checkpoint.resume", resume, f"no such directory; {expected}")
    if not holds_checkpoint(path):
        raise ConfigError("checkpoint.resume", resume, f"is no checkpoint (no {MANIFEST}); {expected}")
