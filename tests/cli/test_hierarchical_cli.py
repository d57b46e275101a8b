"""`lmforge train --comm.hierarchical true` on 4 ranks (forked as torchrun starts them) as 2 nodes x
2 (DDP) reach the per-step losses (1e-5 relative) and final weights (1e-4) of one process on the
same global batch, as flat DDP does (tests/cli/test_ddp_parity.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.cli import read_metrics, tiny_run_args, train_in_process, train_ranks
from tests.helpers.parity import WEIGHT_PARITY, assert_same_final_weights, library_warnings

STEPS = 4
COMMON = ["--train.steps", str(STEPS), "--train.global_batch_size", "8", "--train.eval_interval", "0",
          *WEIGHT_PARITY]


def losses(run_dir: Path) -> list[float]:
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return [r["loss"] for r in rows]


@pytest.mark.slow
@pytest.mark.distributed
def test_hierarchical_ddp_matches_single_process(tiny_data_dir: Path, tmp_path: Path) -> None:
    single, hier = tmp_path / "single", tmp_path / "hier"
    train_in_process(tiny_run_args(tiny_data_dir, single, *COMMON, "--train.micro_batch_size", "8"))
    proc = train_ranks(tiny_run_args(tiny_data_dir, hier, *COMMON, "--train.micro_batch_size", "2",
                                     "--parallel.dp_replicate", "4", "--parallel.dp_shard", "1",
                                     "--comm.hierarchical", "true", "--comm.node_size", "2"), nproc=4)
    assert library_warnings(proc.stderr) == []
    ref, got = losses(single), losses(hier)
    assert ref[-1] < ref[0]
    for step, (a, b) in enumerate(zip(ref, got), start=1):
        assert abs(a - b) <= 1e-5 * abs(a), f"step {step}: {a} vs {b}"
    assert_same_final_weights(single, hier, "hierarchical")
