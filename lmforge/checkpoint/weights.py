"""Weights-only checkpoints: write a model's weights as a checkpoint, and load only the weights of
any checkpoint (a training one too: its top-level "model" key).

Why apart from the manager: these need no process group, no optimizer and no run directory:
importing an HF model into a run, generation, evaluation and export call them from a single
process. The checkpoints are ordinary ones (manifest, atomic publish), so the manager and the
`ckpt` tools read them like any other.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from lmforge.checkpoint.dcp_io import check_model_against, load_flat, quiet_no_dist
from lmforge.checkpoint.errors import CheckpointError, first_line
from lmforge.checkpoint.manifest import (
    UNFINISHED_SUFFIX,
    publish_dir,
    saved_metadata,
    unfinished_dir,
    verify_checkpoint,
    write_manifest,
)
from lmforge.storage.explain import diagnose_write_failure
from lmforge.storage.layout import step_of

__all__ = ["load_model_weights", "save_model_weights"]


def save_model_weights(step_dir: Path, model: nn.Module, step: int | None = None) -> Path:
    """A weights-only checkpoint ({"model": FQN state dict}, manifest, atomic publish) at
    `step_dir`, single process, no process group: for imported models (HF -> run) and exports
    that later commands load with `load_model_weights`. `step` defaults to N of a `step-N` name."""
    step_dir = Path(step_dir)
    if step is None:
        if step_of(step_dir) < 0 or step_dir.name.endswith(UNFINISHED_SUFFIX):
            raise ValueError(f"{step_dir}: name is not step-N; pass step=")
        step = step_of(step_dir)
    tmp = unfinished_dir(step_dir)
    step_dir.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        with quiet_no_dist():
            dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(tmp), no_dist=True)
        write_manifest(tmp, step, 1)
        publish_dir(tmp, step_dir)
    except BaseException as e:
        cause = None if isinstance(e, KeyboardInterrupt | SystemExit) else diagnose_write_failure(e, step_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        if cause is not None:
            raise cause from e  # DCP's CheckpointException is not even an Exception: name the fault
        raise
    return step_dir


def load_model_weights(path: Path, model: nn.Module) -> int:
    """Load only the model weights of checkpoint `path` into `model` in place; returns its step.

    Verifies integrity first (CheckpointError if invalid). Needs no process group and no
    optimizer: reads the top-level "model" key only (for generation, evaluation, export). Every
    rank may call it independently."""
    path = Path(path)
    v = verify_checkpoint(path)
    if not v.ok:
        raise CheckpointError(f"checkpoint {path}: {v.reason}")
    sd = get_model_state_dict(model)
    check_model_against(path, saved_metadata(path), sd)
    flat = {f"model.{k}": v for k, v in sd.items()}
    try:
        load_flat(path, flat)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 (DCP's multi-line errors become one line)
        raise CheckpointError(f"checkpoint {path}: cannot load model weights ({first_line(e)})") from None
    set_model_state_dict(model, {k: flat[f"model.{k}"] for k in sd})
    assert v.step is not None
    return v.step
