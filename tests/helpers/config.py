"""A small valid layout's overrides (4 layers, 4 heads, 2 kv heads, global batch 8) and the check
that a bad parallel layout is refused in one line naming its key, for the config tests."""

from __future__ import annotations

import pytest

from lmforge.config import ConfigError, load_job_config, parse_override_args

BASE = ["--model.dim", "64", "--model.n_layers", "4", "--model.n_heads", "4", "--model.n_kv_heads", "2",
        "--model.vocab_size", "512", "--model.multiple_of", "32", "--model.max_seq_len", "64",
        "--tokenizer.vocab_size", "512", "--train.seq_len", "32", "--train.global_batch_size", "8",
        "--train.micro_batch_size", "4", "--scheduler.warmup_steps", "1"]


def check_parallel_rule(rule: str, world: int, overrides: list[str], key: str, phrase: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_job_config(None, parse_override_args(BASE + overrides), world_size=world)
    message = str(err.value)
    assert "\n" not in message
    assert f"{key} = " in message and phrase in message, message
