"""Turn a Hugging Face Llama directory into an lmforge run directory, so every command that takes
a run (generate, export, eval) takes an imported model too:

    <out>/config.json                      the JobConfig as JSON, model section from config.json
    <out>/tokenizer.json                   copied when the HF directory has one
    <out>/checkpoints/step-00000000/       weights-only checkpoint (DCP, top-level key "model", manifest)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from lmforge.checkpoint.manager import save_model_weights, step_dir_name
from lmforge.config import JobConfig, TokenizerConfig, TrainConfig
from lmforge.models.llama.hf import HFFormatError, import_hf


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
        save_model_weights(tmp / job.checkpoint.folder / step_dir_name(0), model, step=0)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / job.checkpoint.folder / step_dir_name(0)
