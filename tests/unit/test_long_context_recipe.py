"""recipes/tiny-long.toml (issue 13): the tiny model at context 4096 with a sliding window of 256
trains on CPU from packed data, document masking on; a few steps here."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import pytest

from lmforge.config import load_job_config, parse_override_args
from lmforge.models.llama import SIZES
from lmforge.train.trainer import Trainer
from tests.helpers.cli import read_metrics

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny-long.toml"


def test_recipe_is_long_windowed_and_document_masked() -> None:
    cfg = load_job_config(str(RECIPE))
    assert asdict(cfg.model) == asdict(SIZES["tiny-long"])  # `lmforge sizes` lists it with its FLOPs
    assert cfg.train.seq_len == cfg.model.max_seq_len == 4096
    assert cfg.model.attention.layers == ["window"] and cfg.model.attention.window == 256
    assert cfg.model.attention.doc_mask


@pytest.mark.slow
def test_recipe_trains_a_few_steps(tiny_data_dir: Path, tmp_path: Path) -> None:
    # The test's packed data has a 512-token vocabulary: the output layer shrinks to match (at
    # 8192 it is most of a step's FLOPs); attention, context and window are the recipe's.
    overrides = ["--data.dir", str(tiny_data_dir), "--data.max_documents", "120", "--data.val_fraction", "0.05",
                 "--tokenizer.vocab_size", "512", "--model.vocab_size", "512", "--train.output_dir", str(tmp_path / "run"),
                 "--train.steps", "3", "--train.global_batch_size", "1", "--train.eval_interval", "0",
                 "--train.mixed_precision", "fp32", "--checkpoint.enabled", "false", "--scheduler.warmup_steps", "1",
                 "--metrics.log_interval", "1", "--metrics.tensorboard", "false", "--metrics.progress", "none",
                 "--metrics.plot", "false"]
    cfg = load_job_config(str(RECIPE), parse_override_args(overrides))
    trainer = Trainer(cfg, echo=False)
    try:
        assert trainer.eos_id == 0  # document masking on: packed sequences cut at the end-of-text id
        losses = trainer.fit()
    finally:
        trainer.close()
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    train = read_metrics(tmp_path / "run")
    assert train and all(r["tokens_per_s"] > 0 and 0 <= r["mfu"] <= 1 for r in train)
