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

Written whole into a temp directory beside <out>, then renamed (checkpoint/weights_run.py).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from torch import nn

from lmforge.checkpoint.weights_run import derived_run_config, write_weights_run
from lmforge.config import JobConfig, ModelConfig, TokenizerConfig, TrainConfig
from lmforge.storage.strict_json import dumps_strict

REPORT = "pruning.json"


def output_config(run_config: dict | None, cfg: ModelConfig, out: Path, data_dir: Path | None) -> dict:
    """The config.json of the output run (see the module docstring)."""
    if run_config is None:
        job = JobConfig(model=cfg, tokenizer=TokenizerConfig(vocab_size=cfg.vocab_size),
                        train=TrainConfig(output_dir=str(out), seq_len=min(TrainConfig.seq_len, cfg.max_seq_len)))
        d = asdict(job)
        d["data"]["dir"] = str(data_dir.resolve()) if data_dir is not None else ""  # "": eval asks for --data-dir
        return d
    return derived_run_config(run_config, out, data_dir)  # the run's data moved: the data it was pruned with


def write_pruned_run(out: Path, model: nn.Module, config: dict, tokenizer: Path | None, report: dict,
                     overwrite: bool) -> Path:
    """Write the output directory whole (temp then rename); returns its checkpoint step directory.
    The caller checked the destination (storage/guard.py check_destination)."""
    return write_weights_run(out, model, config, tokenizer, overwrite,
                             files={REPORT: dumps_strict(report, indent=2, ensure_ascii=False) + "\n"})
