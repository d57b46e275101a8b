"""Straggler report: one rank made slow (it burns CPU for 60 ms per step) is named in the log and in
the metrics (`straggler_rank`, `step_time_max_over_median`) at every log step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.cli import read_metrics, tiny_run_args, train_ranks


@pytest.mark.timed
@pytest.mark.slow
@pytest.mark.distributed
def test_slow_rank_is_reported(tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMFORGE_FAULTS", json.dumps({"delay_rank": 1, "delay_s": 0.06}))
    proc = train_ranks(tiny_run_args(tiny_data_dir, tmp_path, "--train.steps", "6", "--train.global_batch_size",
                                     "4", "--train.micro_batch_size", "2", "--train.eval_interval", "0",
                                     "--checkpoint.enabled", "false", "--metrics.log_interval", "2",
                                     "--metrics.straggler_factor", "1.5"), nproc=2)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [2, 4, 6]
    for r in rows[1:]:  # the first window holds step 1's one-off work (allocations, memory report)
        assert r["straggler_rank"] == 1, r
        # Rank 1's busy time per step includes the CPU time it burnt (up to 60 ms on a loaded machine);
        # the median of the others is rank 0's (~20 ms).
        assert r["step_time_max_over_median"] > 1.5, r
        assert r["rank_busy_s_median"] < r["rank_busy_s_max"] - 0.02, r
    assert "straggler rank 1" in proc.stdout
