"""Turn a Hugging Face Llama directory into an lmforge run directory, so every command that takes
a run (generate, export, eval) takes an imported model too:

    <out>/config.json                      the JobConfig as JSON, model section from config.json
    <out>/tokenizer.json                   copied when the HF directory has one
    <out>/checkpoints/step-00000000/       DCP checkpoint, weights under the top-level key "model"
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from lmforge.config import JobConfig, TokenizerConfig, TrainConfig
from lmforge.models.llama.hf import HFFormatError, import_hf

STEP_DIR_NAME = "step-{:08d}"


def save_weights_checkpoint(model: torch.nn.Module, step_dir: Path) -> Path:
    """A weights-only DCP checkpoint ({"model": state_dict}), written to a temp dir then renamed."""
    import torch.distributed.checkpoint as dcp

    step_dir = Path(step_dir)
    step_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{step_dir.name}.tmp-", dir=step_dir.parent))
    try:
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save({"model": model.state_dict()}, checkpoint_id=str(tmp), no_dist=True)
        os.replace(tmp, step_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return step_dir


def import_to_run(hf_dir: Path, out: Path) -> Path:
    """Import `hf_dir` (fp32 weights) as a new run directory `out`; returns the checkpoint step dir.
    Refuses an existing non-empty `out` (never overwrites a run)."""
    hf_dir, out = Path(hf_dir), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HFFormatError(f"{out}: already exists and is not empty; choose a new run directory")
    model, cfg = import_hf(hf_dir, "cpu", dtype=torch.float32)
    job = JobConfig(model=cfg,
                    tokenizer=TokenizerConfig(vocab_size=cfg.vocab_size),
                    train=TrainConfig(output_dir=str(out), seq_len=min(TrainConfig.seq_len, cfg.max_seq_len)))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(asdict(job), indent=2) + "\n")
        if (hf_dir / "tokenizer.json").is_file():
            shutil.copyfile(hf_dir / "tokenizer.json", tmp / "tokenizer.json")
        save_weights_checkpoint(model, tmp / job.checkpoint.folder / STEP_DIR_NAME.format(0))
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / job.checkpoint.folder / STEP_DIR_NAME.format(0)
