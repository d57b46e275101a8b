"""`train_ranks` (tests/helpers/cli.py), which most multi-rank parity and resume tests use instead of
torchrun: the same job gives the same losses either way, a failing rank fails the call with its
output, and a job that does not finish is killed at the timeout."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.helpers.cli import read_metrics, run_cli, tiny_run_args, train_ranks

COMMON = ["--train.steps", "3", "--scheduler.warmup_steps", "1", "--train.global_batch_size", "8",
          "--train.micro_batch_size", "4", "--train.eval_interval", "0", "--checkpoint.enabled", "false"]


@pytest.mark.distributed
def test_forked_ranks_compute_what_torchrun_ranks_compute(tiny_data_dir: Path, tmp_path: Path) -> None:
    run_cli(["train", *tiny_run_args(tiny_data_dir, tmp_path / "torchrun", *COMMON)], nproc=2)
    proc = train_ranks(tiny_run_args(tiny_data_dir, tmp_path / "forked", *COMMON), nproc=2)
    assert "world size 2 (gloo): dp_shard=2" in proc.stdout
    rows = {k: read_metrics(tmp_path / k) for k in ("torchrun", "forked")}
    assert [r["step"] for r in rows["forked"]] == [1, 2, 3]
    assert [r["loss"] for r in rows["forked"]] == [r["loss"] for r in rows["torchrun"]]  # bit for bit
    assert [r["grad_norm"] for r in rows["forked"]] == [r["grad_norm"] for r in rows["torchrun"]]


@pytest.mark.distributed
def test_a_failing_rank_fails_the_call_with_its_output(tiny_data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(AssertionError) as failed:
        train_ranks(tiny_run_args(tiny_data_dir, tmp_path / "bad", *COMMON, "--parallel.tp", "3"), nproc=2)
    message = str(failed.value)
    assert "on 2 forked ranks" in message and "exit" in message
    assert "parallel.tp" in message  # the rank's own one-line config error, from its stderr


@pytest.mark.distributed
def test_a_job_past_its_timeout_is_killed(tiny_data_dir: Path, tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(AssertionError, match="timed out after 2 s"):
        train_ranks(tiny_run_args(tiny_data_dir, tmp_path / "long", *COMMON, "--train.steps", "100000",
                                  "--scheduler.warmup_steps", "1"), nproc=2, timeout=2)
    assert time.monotonic() - start < 30
