"""Turn a Hugging Face Llama directory into an lmforge run directory, so every command that takes
a run (generate, export, eval) takes an imported model too:

    <out>/config.json                      the JobConfig as JSON, model section from config.json
    <out>/tokenizer.json                   copied when the HF directory has one
    <out>/checkpoints/step-00000000/       weights-only checkpoint (DCP, top-level key "model", manifest)
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from lmforge.checkpoint.weights import save_model_weights
from lmforge.config import JobConfig, TokenizerConfig, TrainConfig
from lmforge.models.llama.hf import HFFormatError, import_hf
from lmforge.storage.atomic import atomic_copy, atomic_dir, write_text_atomic
from lmforge.storage.guard import DestinationError, check_destination
from lmforge.storage.layout import step_dir_name


def import_to_run(hf_dir: Path, out: Path, overwrite: bool = False) -> Path:
    """Import `hf_dir` (fp32 weights) as a new run directory `out`; returns the checkpoint step dir.
    Refuses an existing non-empty `out` unless `overwrite`, and always an `out` that overlaps
    `hf_dir` (lmforge.storage.guard); written whole into a temp dir, then renamed."""
    hf_dir, out = Path(hf_dir), Path(out)
    try:
        check_destination(out, overwrite, sources={"Hugging Face directory": hf_dir})
    except DestinationError as e:
        raise HFFormatError(str(e)) from None
    model, cfg = import_hf(hf_dir, "cpu", dtype=torch.float32)
    job = JobConfig(model=cfg,
                    tokenizer=TokenizerConfig(vocab_size=cfg.vocab_size),
                    train=TrainConfig(output_dir=str(out), seq_len=min(TrainConfig.seq_len, cfg.max_seq_len)))

    def fill(tmp: Path) -> None:
        write_text_atomic(tmp / "config.json", json.dumps(asdict(job), indent=2) + "\n")
        if (hf_dir / "tokenizer.json").is_file():
            atomic_copy(hf_dir / "tokenizer.json", tmp / "tokenizer.json")
        save_model_weights(tmp / job.checkpoint.folder / step_dir_name(0), model, step=0)

    atomic_dir(out, fill, replace=overwrite)
    return out / job.checkpoint.folder / step_dir_name(0)
