"""The main job (`bash scripts/run_default.sh`: install, data prepare, train recipes/tiny-dense.toml,
generate) must finish in 10 minutes on the slowest CPU kind we meet: 2 AVX2-only cores (Zen 3
EPYC) training in fp32. Training is the part a recipe change can blow, so its matmul FLOPs must
fit what that CPU does in the time the other stages leave."""

from __future__ import annotations

from pathlib import Path

from lmforge.config import load_job_config
from lmforge.observability.flops import training_flops_per_token

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny-dense.toml"

# fp32 training on a quiet 2-core Zen 3 (issue 9): the previous recipe (dim 256, 4 layers, vocab
# 8192, 16 x 256 tokens per step: 33.4 MFLOP/token) ran ~2,000 tokens/s = ~67 GFLOP/s of model FLOPs.
ZEN3_FP32_MODEL_FLOPS_PER_S = 2000 * 33.43e6
# 10 min - install (~1.5) - data prepare, peak measurement, evaluations, checkpoints and the
# sample (~1.5) - margin (~1.5): training gets 5.5 minutes.
TRAIN_SECONDS = 5.5 * 60


def test_tiny_dense_training_fits_the_main_job_budget() -> None:
    cfg = load_job_config(str(RECIPE))
    t = cfg.train
    tokens = t.steps * t.global_batch_size * t.seq_len
    flops = tokens * training_flops_per_token(cfg.model, t.seq_len)
    assert flops <= ZEN3_FP32_MODEL_FLOPS_PER_S * TRAIN_SECONDS, (
        f"tiny-dense needs {flops / 1e12:.1f} TFLOP: ~{flops / ZEN3_FP32_MODEL_FLOPS_PER_S / 60:.1f} min of fp32 "
        f"training on a 2-core Zen 3, over the {TRAIN_SECONDS / 60:.1f} min the main job leaves")
    # Small enough to be fast, not so small it learns nothing visible: >= 600k tokens seen.
    assert tokens >= 600_000
    assert t.mixed_precision == "auto"  # fp32 on AVX2, bf16 where the CPU has it natively
    assert cfg.tokenizer.vocab_size == cfg.model.vocab_size  # no embedding rows the data never uses
    # Evaluations and checkpoints cost time too: a handful, not one per log step.
    assert t.steps // t.eval_interval <= 4 and t.steps // cfg.checkpoint.interval <= 4
