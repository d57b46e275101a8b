"""Load balancing across uneven ranks (comm.load_balance), end to end on 2 DDP ranks: rank 1 is
made slow in proportion to its samples (it burns 50 ms of CPU per sample, LMFORGE_FAULTS
delay_per_sample_s). Re-splitting the global batch by measured speed cuts the step time by >= 25%
against equal splits, with the same per-step losses (fp32, 1e-5 relative: the token-weighted loss
makes the update that of the equal split); the split is in the checkpoint, so a resume continues
with it. The equal run's time breakdown names rank 1 as the one the other waits for."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from tests.helpers.cli import read_metrics, tiny_run_args, train_ranks

STEPS, SAVE_AT = 12, 6
COMMON = ["--train.steps", str(STEPS), "--train.global_batch_size", "8", "--train.micro_batch_size", "4",
          "--train.eval_interval", "0", "--parallel.dp_replicate", "2", "--parallel.dp_shard", "1",
          "--comm.load_balance_interval", "2", "--metrics.straggler_factor", "0"]


@pytest.mark.timed
@pytest.mark.slow
@pytest.mark.distributed
def test_balancing_cuts_step_time_with_equal_losses(tiny_data_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMFORGE_FAULTS", json.dumps({"delay_rank": 1, "delay_per_sample_s": 0.05}))
    equal, balanced, resumed = tmp_path / "equal", tmp_path / "balanced", tmp_path / "resumed"
    first = train_ranks(tiny_run_args(tiny_data_dir, equal, *COMMON, "--checkpoint.enabled", "false"),
                        nproc=2)
    on = ["--comm.load_balance", "true", "--checkpoint.interval", str(SAVE_AT)]
    train_ranks(tiny_run_args(tiny_data_dir, balanced, *COMMON, *on), nproc=2)
    saved = balanced / "checkpoints" / f"step-{SAVE_AT:08d}"
    proc = train_ranks(tiny_run_args(tiny_data_dir, resumed, *COMMON, *on, "--checkpoint.resume", str(saved)),
                       nproc=2)
    assert f"resumed from {saved}" in proc.stdout
    a, b, c = read_metrics(equal), read_metrics(balanced), read_metrics(resumed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    assert [r["step"] for r in c] == list(range(SAVE_AT + 1, STEPS + 1))
    for r, rb in zip(a, b):
        assert abs(rb["loss"] - r["loss"]) <= 1e-5 * abs(r["loss"]), (r["step"], r["loss"], rb["loss"])
    # rank 1 got fewer samples; the resumed run started with the split saved at SAVE_AT, and its
    # losses are those of the straight run
    assert b[SAVE_AT - 1]["lb_min_share"] < 0.5
    assert c[0]["lb_min_share"] == b[SAVE_AT - 1]["lb_min_share"], (c[0], b[SAVE_AT - 1])
    for r, rc in zip(b[SAVE_AT:], c):
        assert abs(rc["loss"] - r["loss"]) <= 1e-5 * abs(r["loss"]), (r["step"], r["loss"], rc["loss"])
    late = range(STEPS - 4, STEPS)  # steps 8-12: the split settled (re-split at 2, 4, ...)
    t_equal = statistics.median(a[i]["step_time_s"] for i in late)
    t_balanced = statistics.median(b[i]["step_time_s"] for i in late)
    cut = 1 - t_balanced / t_equal
    print(f"step time, median of steps {late.start + 1}-{late.stop}: equal splits {t_equal * 1e3:.1f} ms, "
          f"balanced {t_balanced * 1e3:.1f} ms: cut {cut:.0%}; rank 1's share {b[-1]['lb_min_share']:.3f}")
    assert cut >= 0.25, (t_equal, t_balanced)
    # the straggler-aware verdict of the equal run: rank 1 computes, rank 0 waits for it
    assert [r["critical_rank"] for r in a[2:]] == [1] * (STEPS - 2) and a[-1]["bound"] == 0, a
    assert "compute-bound" in first.stdout and "rank 1 is the slowest" in first.stdout, first.stdout
