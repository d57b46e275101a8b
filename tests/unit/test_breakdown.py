"""Time breakdown (lmforge/observability/breakdown.py): the parts of a real run sum to its wall
time measured from outside, a slow loader makes the run data-bound, and the verdict reads the rank
the others wait for."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from lmforge.config import load_job_config, parse_override_args
from lmforge.observability.breakdown import (
    BOUND_CODES,
    PARTS,
    Breakdown,
    StepBreakdown,
    classify,
    compute_advice,
    critical_rank,
    summary_line,
    window_metrics,
)
from lmforge.observability.metrics import read_metrics
from lmforge.train.trainer import Trainer
from tests.helpers.cli import tiny_run_args

pytestmark = pytest.mark.usefixtures("one_thread")


def _b(steps: int = 1, **parts: float) -> Breakdown:
    return Breakdown({p: parts.get(p, 0.0) for p in PARTS}, steps)


@pytest.mark.timed
def test_a_phase_inside_another_counts_once_as_its_own_part() -> None:
    """An optimizer step's collective (comm.adam_moments = 'local') runs inside "compute": its time
    is communication, and compute keeps only the rest, so the parts still sum to the wall time."""
    bd = StepBreakdown(torch.device("cpu"), None)
    bd.start()
    with bd.phase("compute"):
        time.sleep(0.05)
        with bd.phase("comm_exposed"):
            time.sleep(0.1)
    parts = bd.window().parts
    assert 0.1 <= parts["comm_exposed"] < 0.13, parts
    assert 0.05 <= parts["compute"] < 0.08, parts
    assert parts["idle"] < 0.02, parts


def test_classify_picks_the_largest_part_against_compute() -> None:
    assert classify(_b(compute=0.5, comm_exposed=0.4, data=0.1)) == ("compute", pytest.approx(0.5))
    assert classify(_b(compute=0.3, comm_exposed=0.41, data=0.29)) == ("communication", pytest.approx(0.41))
    assert classify(_b(compute=0.2, data=0.7, idle=0.1)) == ("data", pytest.approx(0.7))
    assert classify(_b(compute=0.2, ckpt=0.6, idle=0.2)) == ("checkpoint", pytest.approx(0.6))


def test_summary_names_the_rank_the_others_wait_for() -> None:
    slow_network = [_b(compute=0.3, comm_exposed=0.7), _b(compute=0.35, comm_exposed=0.65)]
    assert critical_rank(slow_network) == 1
    line = summary_line(slow_network)
    assert line.startswith("communication-bound: 65% exposed comm; try int8 compression (--comm.compression int8)")
    assert "slowest" not in line
    slow_rank = [_b(compute=0.3, comm_exposed=0.6, idle=0.1), _b(compute=0.9, comm_exposed=0.02, idle=0.08)]
    line = summary_line(slow_rank)
    assert line.startswith("compute-bound: 90% compute"), line
    assert "rank 1 is the slowest" in line and "wait 60% in communication" in line
    m = window_metrics(slow_rank)
    assert m["critical_rank"] == 1 and m["bound"] == BOUND_CODES["compute"]
    assert m["time_comm_exposed_s"] == pytest.approx(0.31)  # the mean over ranks


def test_compute_advice_names_only_what_the_run_does_not_use() -> None:
    compute_bound = [_b(compute=0.96, idle=0.04)]
    fp32_on_bf16_cpu = summary_line(compute_bound, compute_advice("fp32", bf16_native=True, compiled=False))
    assert fp32_on_bf16_cpu == ("compute-bound: 96% compute; try bf16 mixed precision (--train.mixed_precision bf16), "
                                "or torch.compile (--train.compile true)")
    bf16 = summary_line(compute_bound, compute_advice("bf16", bf16_native=True, compiled=False))
    assert bf16 == "compute-bound: 96% compute; try torch.compile (--train.compile true)"
    assert "bf16" not in summary_line(compute_bound, compute_advice("fp32", bf16_native=False, compiled=False))
    done = summary_line(compute_bound, compute_advice("bf16", bf16_native=True, compiled=True))
    assert done == "compute-bound: 96% compute, already bf16 and compiled: the matmuls themselves bound the step"
    assert "try" not in done


def _run(tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch, faults: dict | None,
         *extra: str) -> tuple[float, list[dict], dict, str]:
    if faults:
        monkeypatch.setenv("LMFORGE_FAULTS", json.dumps(faults))
    args = tiny_run_args(data_dir, tmp_path, "--train.steps", "12", "--train.global_batch_size", "4",
                         "--train.micro_batch_size", "2", "--checkpoint.enabled", "false",
                         "--metrics.log_interval", "4", *extra)
    cfg = load_job_config(None, parse_override_args(args))
    lines: list[str] = []
    trainer = Trainer(cfg, echo=False)
    trainer.say = lines.append  # the end-of-run line, without printing
    try:
        t0 = time.perf_counter()
        trainer.fit()
        wall = time.perf_counter() - t0
    finally:
        trainer.close()
    rows = read_metrics(tmp_path / "metrics.jsonl", "train")
    summary = read_metrics(tmp_path / "metrics.jsonl", "summary")[-1]
    return wall, rows, summary, "\n".join(lines)


@pytest.mark.timed
def test_parts_sum_to_the_wall_time(tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fit() wall time, measured here, against the run's parts (evaluations included: one every
    5 steps, so some fall inside a window)."""
    wall, rows, summary, text = _run(tmp_path, tiny_data_dir, monkeypatch, None, "--train.eval_interval", "5")
    total = sum(summary[f"time_{p}_s"] for p in PARTS)
    print(f"fit wall {wall:.3f} s, breakdown sum {total:.3f} s, parts {summary}")
    assert abs(total - wall) <= 0.05 * wall, (total, wall)
    # measured, not a remainder: idle (what no timer saw) is a small share
    assert summary["time_idle_s"] < 0.2 * wall, summary
    assert summary["time_eval_s"] > 0 and summary["time_data_s"] > 0 and summary["time_compute_s"] > 0.4 * wall
    assert summary["time_comm_exposed_s"] == 0.0  # one process: no gradient collective
    windows = sum(sum(r[f"time_{p}_s"] for p in PARTS) for r in rows)
    assert windows <= total + 1e-9  # the log windows, without what followed the last log step
    assert [r["step"] for r in rows] == [4, 8, 12] and all(r["step_time_s"] > 0 for r in rows)
    assert "compute-bound" in text


@pytest.mark.timed
def test_slow_loader_is_data_bound(tiny_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wall, rows, summary, text = _run(tmp_path, tiny_data_dir, monkeypatch, {"loader_delay_s": 0.08},
                                     "--train.eval_interval", "0")
    print(text, summary)
    assert summary["bound"] == BOUND_CODES["data"], summary
    assert all(r["bound"] == BOUND_CODES["data"] for r in rows[1:]), rows  # the first holds step 1's warm-up
    assert summary["time_data_s"] >= 12 * 0.08  # every step's batch came 80 ms late
    assert text.startswith("time breakdown: data-bound: ")
