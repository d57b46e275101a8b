"""Bad parallel layouts are refused before anything starts: one rule, one clear message each."""

from __future__ import annotations

import pytest

from lmforge.config import load_job_config, parse_override_args
from tests.helpers.config import BASE, check_parallel_rule

RULES = [
    # (rule, world size, overrides, key, phrase)
    ("degrees multiply to world", 4, ["--parallel.tp", "2", "--parallel.dp_shard", "1"], "parallel",
     "multiply to the world size (4)"),
    ("world not divisible", 3, ["--parallel.tp", "2"], "parallel", "multiply to the world size (3)"),
    ("degree below one", 1, ["--parallel.tp", "0"], "parallel.tp", "must be >= 1"),
    ("dp_shard zero", 1, ["--parallel.dp_shard", "0"], "parallel.dp_shard", "-1 for what the other degrees leave"),
    ("tp divides heads", 3, ["--parallel.tp", "3", "--model.n_kv_heads", "4"], "parallel.tp", "model.n_heads (4)"),
    ("tp divides kv heads", 4, ["--parallel.tp", "4"], "parallel.tp", "key/value heads (2)"),
    ("tp divides ffn", 2, ["--parallel.tp", "2", "--model.ffn_hidden", "33"], "parallel.tp", "feed-forward width (33)"),
    ("tp divides vocab", 2, ["--parallel.tp", "2", "--model.vocab_size", "513"], "parallel.tp",
     "model.vocab_size (513)"),
    ("tp divides seq with SP", 2, ["--parallel.tp", "2", "--train.seq_len", "31"], "parallel.tp",
     "train.seq_len (31)"),
    ("stages beyond layers", 8, ["--parallel.pp", "8", "--train.micro_batch_size", "8"], "parallel.pp",
     "8 pipeline stages but model.n_layers is 4"),
    ("virtual stages beyond layers", 4, ["--parallel.pp", "4", "--parallel.pp_schedule", "interleaved_1f1b",
                                         "--train.micro_batch_size", "8"], "parallel.pp", "8 pipeline stages"),
    ("V schedule needs two stages", 2, ["--parallel.pp", "2", "--parallel.pp_schedule", "zbv",
                                        "--parallel.pp_stages_per_rank", "1"], "parallel.pp_stages_per_rank",
     "must be 2"),
    ("interleaved needs several stages", 2, ["--parallel.pp", "2", "--parallel.pp_schedule", "interleaved_1f1b",
                                             "--parallel.pp_stages_per_rank", "1"], "parallel.pp_stages_per_rank",
     ">= 2"),
    ("single-stage schedule", 2, ["--parallel.pp", "2", "--parallel.pp_schedule", "1f1b",
                                  "--parallel.pp_stages_per_rank", "2"], "parallel.pp_stages_per_rank", "must be 1"),
    ("explicit split length", 2, ["--parallel.pp", "2", "--parallel.pp_layers_per_stage", "1,1,2"],
     "parallel.pp_layers_per_stage", "must list 2 stages"),
    ("explicit split sum", 2, ["--parallel.pp", "2", "--parallel.pp_layers_per_stage", "1,2"],
     "parallel.pp_layers_per_stage", "sum to model.n_layers (4)"),
    ("explicit split empty stage", 2, ["--parallel.pp", "2", "--parallel.pp_layers_per_stage", "0,4"],
     "parallel.pp_layers_per_stage", "at least one layer"),
    ("too few microbatches", 2, ["--parallel.pp", "2", "--parallel.pp_microbatches", "1"],
     "parallel.pp_microbatches", "must be >= 2"),
    ("dualpipev microbatches", 2, ["--parallel.pp", "2", "--parallel.pp_schedule", "dualpipev",
                                   "--parallel.pp_microbatches", "2"], "parallel.pp_microbatches", "must be >= 4"),
    ("microbatches divide batch", 2, ["--parallel.pp", "2", "--parallel.pp_microbatches", "3"],
     "parallel.pp_microbatches", "must divide train.micro_batch_size (4)"),
    ("batch over dp ranks", 4, ["--train.micro_batch_size", "4"], "train.global_batch_size", "4 x 4 = 16"),
    ("plain DDP with TP", 4, ["--parallel.dp_replicate", "2", "--parallel.dp_shard", "1", "--parallel.tp", "2",
                              "--train.micro_batch_size", "4"], "parallel.dp_replicate", "does not combine"),
    ("unknown schedule", 2, ["--parallel.pp", "2", "--parallel.pp_schedule", "zigzag"], "parallel.pp_schedule",
     "one of"),
]


@pytest.mark.parametrize("rule,world,overrides,key,phrase", RULES, ids=[r[0] for r in RULES])
def test_parallel_rule(rule: str, world: int, overrides: list[str], key: str, phrase: str) -> None:
    check_parallel_rule(rule, world, overrides, key, phrase)


@pytest.mark.parametrize("world,overrides,expected", [
    (1, [], (1, 1, 1, 1)),
    (4, ["--train.micro_batch_size", "2"], (1, 4, 1, 1)),
    (4, ["--parallel.dp_replicate", "2", "--train.micro_batch_size", "2"], (2, 2, 1, 1)),
    (8, ["--parallel.tp", "2", "--parallel.pp", "2", "--parallel.sequence_parallel", "false",
         "--train.micro_batch_size", "2"], (1, 2, 2, 2)),
    (4, ["--parallel.tp", "2", "--parallel.pp", "2", "--train.micro_batch_size", "8"], (1, 1, 2, 2)),  # SP x PP
])
def test_dp_shard_takes_the_rest(world: int, overrides: list[str], expected: tuple) -> None:
    cfg = load_job_config(None, parse_override_args(BASE + overrides), world_size=world)
    r = cfg.parallel.resolved(world)
    assert (r.dp_replicate, r.dp_shard, r.tp, r.pp) == expected
