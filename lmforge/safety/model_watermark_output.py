"""The directory `lmforge watermark embed-model` writes: an ordinary lmforge run directory, so `lmforge
eval`, `generate`, `serve`, `compress` and `train --train.init_from` take it with no extra flag:

    <out>/config.json                  the source run's config (train.output_dir = <out>; data.dir made
                                       absolute when it resolves from here, so eval finds the held-out
                                       data from any working directory)
    <out>/tokenizer.json               the source's, when it has one
    <out>/checkpoints/step-00000000/   weights-only checkpoint of the marked model

Nothing in it says it is marked (no report file): a mark announced is a mark invited to be attacked;
the embed report is printed instead. Written whole into a temp directory beside <out>, then renamed
(storage/atomic.py atomic_dir); the source is only read.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from torch import nn

from lmforge.checkpoint.weights import save_model_weights
from lmforge.storage.atomic import atomic_copy, atomic_dir, write_text_atomic
from lmforge.storage.layout import RunDir, step_dir_name

__all__ = ["marked_run_config", "write_marked_run"]

STEP = 0


def marked_run_config(run_config: dict, out: Path) -> dict:
    """The output run's config.json (see the module docstring)."""
    d = copy.deepcopy(run_config)
    d.setdefault("train", {})["output_dir"] = str(out)
    data = d.get("data") if isinstance(d.get("data"), dict) else None
    if data is not None and data.get("dir") and Path(data["dir"]).is_dir():
        data["dir"] = str(Path(data["dir"]).resolve())
    return d


def write_marked_run(out: Path, model: nn.Module, run_config: dict, tokenizer: Path | None, overwrite: bool) -> Path:
    """Write the run directory whole; returns its checkpoint step directory. The caller checked the
    destination (storage/guard.py check_destination)."""
    out = Path(out)
    config = marked_run_config(run_config, out)
    ck = config.get("checkpoint") if isinstance(config.get("checkpoint"), dict) else {}
    folder = str(ck.get("folder", "checkpoints"))

    def fill(tmp: Path) -> None:
        run = RunDir(tmp, folder)
        write_text_atomic(run.config, json.dumps(config, indent=2) + "\n")
        if tokenizer is not None and Path(tokenizer).is_file():
            atomic_copy(Path(tokenizer), run.tokenizer)
        save_model_weights(run.checkpoints / step_dir_name(STEP), model, step=STEP)

    atomic_dir(out, fill, replace=overwrite)
    return RunDir(out, folder).checkpoints / step_dir_name(STEP)
