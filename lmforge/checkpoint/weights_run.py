"""A run directory holding one weights-only checkpoint: what `lmforge import`, `compress prune` and
`watermark embed-model` write, so that `eval`, `generate`, `serve`, `export`, `compress` and
`train --train.init_from` take it as they take a trained run, with no extra flag:

    <out>/config.json                  a JobConfig as JSON (`derived_run_config` for a run made
                                       from another run)
    <out>/tokenizer.json               the source's, when it has one
    <out>/<checkpoint.folder>/step-00000000/   weights-only checkpoint (weights.py)
    <out>/<name>                       any report the caller adds

Written whole into a temp directory beside <out>, then renamed (storage/atomic.py atomic_dir): a
reader never sees half a run, and an `--overwrite` replaces the old one only once the new is whole.
The caller has checked the destination (storage/guard.py check_destination)."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path

from torch import nn

from lmforge.checkpoint.weights import save_model_weights
from lmforge.storage.atomic import atomic_copy, atomic_dir, write_text_atomic
from lmforge.storage.layout import RunDir, step_dir_name

__all__ = ["STEP", "derived_run_config", "write_weights_run"]

STEP = 0


def derived_run_config(run_config: dict, out: Path, data_dir: Path | None = None) -> dict:
    """The source run's config for a run made from it at `out`: train.output_dir = out, and data.dir
    made absolute when it resolves from here (eval then finds the held-out data from any working
    directory); when it does not, `data_dir` (the data the new run was made with) if given."""
    d = copy.deepcopy(run_config)
    d.setdefault("train", {})["output_dir"] = str(out)
    data = d.get("data") if isinstance(d.get("data"), dict) else None
    if data is not None and data.get("dir") and Path(data["dir"]).is_dir():
        data["dir"] = str(Path(data["dir"]).resolve())
    elif data is not None and data_dir is not None:
        data["dir"] = str(Path(data_dir).resolve())
    return d


def write_weights_run(out: Path, model: nn.Module, config: dict, tokenizer: Path | None, overwrite: bool,
                      files: Mapping[str, str] | None = None) -> Path:
    """Write the run directory whole (see the module docstring); `files`: name -> text of reports
    beside config.json. Returns the checkpoint step directory."""
    out = Path(out)
    ck = config.get("checkpoint") if isinstance(config.get("checkpoint"), dict) else {}
    folder = str(ck.get("folder", "checkpoints"))

    def fill(tmp: Path) -> None:
        run = RunDir(tmp, folder)
        write_text_atomic(run.config, json.dumps(config, indent=2) + "\n")
        if tokenizer is not None and Path(tokenizer).is_file():
            atomic_copy(Path(tokenizer), run.tokenizer)
        save_model_weights(run.checkpoints / step_dir_name(STEP), model, step=STEP)
        for name, text in (files or {}).items():
            write_text_atomic(tmp / name, text)

    atomic_dir(out, fill, replace=overwrite)
    return RunDir(out, folder).checkpoints / step_dir_name(STEP)
