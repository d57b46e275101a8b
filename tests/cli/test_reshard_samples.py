"""Resharding on resume includes the data loader: a run whose data-parallel size changes at each
resume (2 -> 1 -> 2 ranks) trains on exactly the samples of the uninterrupted run, each once.

Sample ids come from `train.trace_samples` (lmforge/train/trace.py): per step and rank, the global
loader positions (unique ids) and the token windows they map to."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from lmforge.train.trace import read_traces
from tests.helpers.cli import run_cli, tiny_run_args, train_in_process, train_ranks

STEPS = 9
COMMON = ["--train.steps", str(STEPS), "--train.global_batch_size", "4", "--train.eval_interval", "0",
          "--checkpoint.interval", "3", "--train.trace_samples", "true"]


def samples(run: Path) -> tuple[list[int], Counter, dict[int, set[int]]]:
    """(all positions, multiset of windows, {step: positions}) over the run's ranks."""
    positions, windows, per_step = [], Counter(), {}
    for r in read_traces(run):
        positions += r["positions"]
        windows.update(r["windows"])
        per_step.setdefault(r["step"], set()).update(r["positions"])
    return positions, windows, per_step


@pytest.mark.slow
@pytest.mark.distributed
def test_dp_2_to_1_to_2_sees_each_sample_once(tiny_data_dir: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    train_in_process(tiny_run_args(tiny_data_dir, straight, *COMMON, "--train.micro_batch_size", "4"))

    run = tmp_path / "resharded"
    # dp 2 for steps 1-3, dp 1 (2 micro-batches of 2 accumulated) for 4-6, dp 2 again for 7-9.
    train_ranks(tiny_run_args(tiny_data_dir, run, *COMMON, "--train.micro_batch_size", "2",
                              "--train.stop_at", "3"), nproc=2)
    proc = run_cli(["train", *tiny_run_args(tiny_data_dir, run, *COMMON, "--train.micro_batch_size", "2",
                                            "--train.stop_at", "6", "--checkpoint.resume", "auto")])
    assert "resumed from" in proc.stdout and "step-00000003" in proc.stdout
    proc = train_ranks(tiny_run_args(tiny_data_dir, run, *COMMON, "--train.micro_batch_size", "2",
                                     "--checkpoint.resume", "auto"), nproc=2)
    assert "step-00000006" in proc.stdout

    ref_pos, ref_windows, ref_steps = samples(straight)
    got_pos, got_windows, got_steps = samples(run)
    assert sorted(ref_pos) == list(range(STEPS * 4))  # the uninterrupted run: positions 0..35, once each
    assert len(got_pos) == len(set(got_pos)), "a sample was seen twice"
    assert sorted(got_pos) == sorted(ref_pos), "samples missing or extra"
    assert got_windows == ref_windows  # the same token windows, the same number of times
    assert got_steps == ref_steps  # and each in the same optimizer step
    # Both layouts really ran: two ranks wrote steps 1-3 and 7-9, one rank steps 4-6.
    ranks = {(r["step"], r["rank"]) for r in read_traces(run)}
    assert {(s, 1) for s in (1, 2, 3, 7, 8, 9)} <= ranks and not {(s, 1) for s in (4, 5, 6)} & ranks
