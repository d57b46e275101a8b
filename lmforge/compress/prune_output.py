"""The directory `lmforge compress prune` writes: an lmforge run directory, so `lmforge eval DIR`,
`lmforge generate DIR` and `lmforge export DIR` load it with no extra flag, plus the pruning report:

    <out>/config.json                  the source run's config (train.output_dir = <out>, data.dir
                                       absolute when it exists, else --calib-data's, so eval finds
                                       the held-out data from any working directory); an HF source:
                                       a JobConfig as interop/hf/importer.py import_to_run writes,
                                       data.dir = --calib-data's or "" (eval then asks for --data-dir)
    <out>/tokenizer.json               the source's, when it has one
    <out>/checkpoints/step-00000000/   weights-only checkpoint (dense fp32 tensors holding the zeros)
    <out>/pruning.json                 method, scheme, per-layer sparsity, calibration provenance,
                                       recovery losses (strict JSON)

Written whole into a temp directory beside <out>, then renamed (storage/atomic.py atomic_dir).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path

from torch import nn

from lmforge.checkpoint.weights import save_model_weights
from lmforge.config import JobConfig, ModelConfig, TokenizerConfig, TrainConfig
from lmforge.storage.atomic import atomic_copy, atomic_dir, write_text_atomic
from lmforge.storage.layout import RunDir, step_dir_name
from lmforge.storage.strict_json import dumps_strict

REPORT = "pruning.json"
STEP = 0


def output_config(run_config: dict | None, cfg: ModelConfig, out: Path, data_dir: Path | None) -> dict:
    """The config.json of the output run (see the module docstring)."""
    if run_config is None:
        job = JobConfig(model=cfg, tokenizer=TokenizerConfig(vocab_size=cfg.vocab_size),
                        train=TrainConfig(output_dir=str(out), seq_len=min(TrainConfig.seq_len, cfg.max_seq_len)))
        d = asdict(job)
        d["data"]["dir"] = str(data_dir.resolve()) if data_dir is not None else ""  # "": eval asks for --data-dir
        return d
    d = copy.deepcopy(run_config)
    d.setdefault("train", {})["output_dir"] = str(out)
    data = d.get("data") if isinstance(d.get("data"), dict) else None
    if data is not None and data.get("dir") and Path(data["dir"]).is_dir():
        data["dir"] = str(Path(data["dir"]).resolve())
    elif data is not None and data_dir is not None:  # the run's data moved: the data it was pruned with
        data["dir"] = str(Path(data_dir).resolve())
    return d


def checkpoint_folder(config: dict) -> str:
    ck = config.get("checkpoint") if isinstance(config.get("checkpoint"), dict) else {}
    return str(ck.get("folder", "checkpoints"))


def write_pruned_run(out: Path, model: nn.Module, config: dict, tokenizer: Path | None, report: dict,
                     overwrite: bool) -> Path:
    """Write the output directory whole (temp then rename); returns its checkpoint step directory.
    The caller checked the destination (storage/guard.py check_destination)."""
    out = Path(out)
    folder = checkpoint_folder(config)

    def fill(tmp: Path) -> None:
        run = RunDir(tmp, folder)
        write_text_atomic(run.config, json.dumps(config, indent=2) + "\n")
        if tokenizer is not None and Path(tokenizer).is_file():
            atomic_copy(Path(tokenizer), run.tokenizer)
        save_model_weights(run.checkpoints / step_dir_name(STEP), model, step=STEP)
        write_text_atomic(tmp / REPORT, dumps_strict(report, indent=2, ensure_ascii=False) + "\n")

    atomic_dir(out, fill, replace=overwrite)
    return RunDir(out, folder).checkpoints / step_dir_name(STEP)
