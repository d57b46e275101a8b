"""tokens/s between two log lines is that of the training steps alone: checkpoint saves and
evaluations in between are left out of both the time and the step count.

The old loop reset the window's start time after a save but not its step count: with
memory_interval=2 and log_interval=10 it divided 10 steps' tokens by the time of the last 2
(~5x too high); evaluations were charged to the window (too low). Saves and evaluations are made
slow here (a sleep) so either mistake moves the figure far from the truth, which is measured
independently: the wall time of each `train_step` call.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lmforge.checkpoint.tiers import TieredCheckpoints
from lmforge.config import load_job_config, parse_override_args
from lmforge.train.trainer import Trainer
from tests.helpers.cli import read_metrics, tiny_run_args

STEPS, LOG_EVERY, SLOW_S = 20, 10, 0.25
CASES = {
    # memory-tier snapshots every 2 steps (a durable one at the end), no evaluation
    "saves": ["--checkpoint.memory_interval", "2", "--checkpoint.interval", "100", "--train.eval_interval", "0"],
    # an evaluation every 3 steps (so one falls between log steps), no checkpoints
    "evals": ["--checkpoint.enabled", "false", "--train.eval_interval", "3"],
}


@pytest.mark.timed
@pytest.mark.parametrize("case", sorted(CASES))
def test_logged_tokens_per_s_is_that_of_the_steps(case: str, tiny_data_dir: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    step_seconds: list[float] = []
    saved: list[int] = []
    evaluated: list[float] = []
    train_step = Trainer.train_step

    def timed_step(self: Trainer):  # noqa: ANN202 - the original's return
        t0 = time.perf_counter()
        out = train_step(self)
        step_seconds.append(time.perf_counter() - t0)
        return out

    def slow_save(self: TieredCheckpoints, step: int, state: object, tier: str = "disk") -> Path:
        time.sleep(SLOW_S)
        saved.append(step)
        return tmp_path / f"fake-step-{step}"

    def slow_evaluate(self: Trainer) -> float:
        time.sleep(SLOW_S)
        evaluated.append(1.0)
        return 1.0

    monkeypatch.setattr(Trainer, "train_step", timed_step)
    monkeypatch.setattr(TieredCheckpoints, "save", slow_save)
    monkeypatch.setattr(Trainer, "evaluate", slow_evaluate)

    args = tiny_run_args(tiny_data_dir, tmp_path / "run", "--train.steps", str(STEPS), "--train.global_batch_size", "4",
                         "--train.micro_batch_size", "2", "--metrics.log_interval", str(LOG_EVERY),
                         "--checkpoint.memory_dir", str(tmp_path / "shm"), *CASES[case])
    cfg = load_job_config(None, parse_override_args(args))
    trainer = Trainer(cfg, echo=False)
    try:
        trainer.fit()
    finally:
        trainer.close()

    assert len(step_seconds) == STEPS
    if case == "saves":
        assert saved == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    else:
        assert len(evaluated) == 7  # steps 3, 6, ..., 18 and the last
    tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
    rows = [r for r in read_metrics(tmp_path / "run") if "tokens_per_s" in r]
    assert [r["step"] for r in rows] == [10, 20]
    for r in rows:
        window = step_seconds[r["step"] - LOG_EVERY:r["step"]]
        truth = LOG_EVERY * tokens_per_step / sum(window)
        # The window holds the steps plus a little loop bookkeeping: never faster than the steps,
        # and far from a window that lost steps' time (5x high) or gained a 0.25 s pause (low).
        assert 0.6 * truth < r["tokens_per_s"] <= 1.02 * truth, (case, r["step"], r["tokens_per_s"], truth)
        # MFU of the same window; the FLOPs are those of the documents trained (document masking:
        # a few fewer pairs than one document per sequence, tests/unit/test_step_flops.py)
        one_document = r["tokens_per_s"] * trainer.flops_per_token / 1e11
        assert 0.99 * one_document <= r["mfu"] <= one_document


def test_an_impossible_mfu_says_the_peak_is_wrong(tiny_data_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A peak below what the run achieves (a cached peak measured on a busy machine) makes MFU
    read over 100%: the run says so once, naming the fix, instead of printing the figure silently."""
    args = tiny_run_args(tiny_data_dir, tmp_path / "run", "--train.steps", "4", "--metrics.log_interval", "2",
                         "--checkpoint.enabled", "false", "--train.eval_interval", "0",
                         "--metrics.peak_flops", "1e3")
    trainer = Trainer(load_job_config(None, parse_override_args(args)), echo=True)
    try:
        trainer.fit()
    finally:
        trainer.close()
    rows = [r for r in read_metrics(tmp_path / "run") if "mfu" in r]
    assert len(rows) == 2 and all(r["mfu"] > 1.0 for r in rows)
    warnings = [ln for ln in capsys.readouterr().out.splitlines() if "MFU reads" in ln]
    assert len(warnings) == 1 and "lmforge bench peak --force" in warnings[0]
