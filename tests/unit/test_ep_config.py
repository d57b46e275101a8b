"""parallel.ep: the rules (one clear line each) and what a valid ep layout resolves to."""

from __future__ import annotations

import pytest

from lmforge.config import load_job_config, parse_override_args
from tests.helpers.config import BASE
from tests.helpers.config import check_parallel_rule as check_rule

MOE = ["--model.moe.n_experts", "4", "--model.moe.top_k", "2"]

RULES = [
    # (rule, world size, overrides, key, phrase)
    ("ep below one", 1, [*MOE, "--parallel.ep", "0"], "parallel.ep", "must be >= 1"),
    ("ep needs MoE", 2, ["--parallel.ep", "2"], "parallel.ep", "needs MoE layers"),
    ("ep divides experts", 3, [*MOE, "--parallel.ep", "3", "--train.global_batch_size", "12"], "parallel.ep",
     "must divide model.moe.n_experts (4)"),
    ("ep divides dp_shard", 2, [*MOE, "--parallel.ep", "4", "--train.micro_batch_size", "4"], "parallel.ep",
     "must divide parallel.dp_shard (2)"),
    ("ep borrows dp_shard, not dp_replicate", 2, [*MOE, "--parallel.ep", "2", "--parallel.dp_replicate", "2",
                                                  "--parallel.dp_shard", "1"], "parallel.ep",
     "must divide parallel.dp_shard (1)"),
]


@pytest.mark.parametrize("rule,world,overrides,key,phrase", RULES, ids=[r[0] for r in RULES])
def test_ep_rule(rule: str, world: int, overrides: list[str], key: str, phrase: str) -> None:
    check_rule(rule, world, overrides, key, phrase)  # one line naming key, value and what is allowed


@pytest.mark.parametrize("world,overrides,expected", [
    (2, ["--parallel.ep", "2"], (1, 2, 2)),  # ep=2 x dp_shard=2 on 2 ranks: ep borrows both dp_shard ranks
    (4, ["--parallel.ep", "2", "--train.micro_batch_size", "2"], (1, 4, 2)),  # dp_shard=4: experts FSDP over 2
    (4, ["--parallel.ep", "2", "--parallel.dp_replicate", "2", "--train.micro_batch_size", "2"], (2, 2, 2)),  # HSDP: ep inside dp_shard
    (4, ["--parallel.ep", "2", "--parallel.pp", "2"], (1, 2, 2)),  # ep within each pipeline stage
    (4, ["--parallel.ep", "2", "--parallel.tp", "2"], (1, 2, 2)),  # ep over dp_shard, MoE replicated over tp
])
def test_ep_is_not_a_world_factor(world: int, overrides: list[str], expected: tuple) -> None:
    cfg = load_job_config(None, parse_override_args(BASE + MOE + overrides), world_size=world)
    r = cfg.parallel.resolved(world)
    assert (r.dp_replicate, r.dp_shard, r.ep) == expected
    assert cfg.accum_steps(world) == 8 // (cfg.train.micro_batch_size * r.dp_degree)
