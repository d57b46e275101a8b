"""[energy] enabled in a real run: `energy_j` per log window in the train rows, an "energy" summary
row whose total equals the sum of the windows (the step records), and one line saying how the
joules were obtained (a stated estimate on a machine without RAPL or NVML)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from lmforge.config import load_job_config, parse_override_args
from lmforge.train.trainer import Trainer
from tests.helpers.cli import read_metrics, tiny_run_args

pytestmark = pytest.mark.usefixtures("one_thread")


def test_run_energy_is_the_sum_of_its_windows(tiny_data_dir: Path, tmp_path: Path) -> None:
    args = tiny_run_args(tiny_data_dir, tmp_path, "--train.steps", "6", "--metrics.log_interval", "2",
                         "--train.eval_interval", "3", "--checkpoint.enabled", "false",
                         "--energy.enabled", "true", "--energy.carbon_g_per_kwh", "400")
    cfg = load_job_config(None, parse_override_args(args))
    lines: list[str] = []
    trainer = Trainer(cfg, echo=False)
    trainer.say = lines.append
    try:
        trainer.fit()
    finally:
        trainer.close()
    windows = [r["energy_j"] for r in read_metrics(tmp_path) if "energy_j" in r]
    assert len(windows) == 3 and all(j > 0 for j in windows)
    (total,) = read_metrics(tmp_path, "energy")
    assert total["energy_steps"] == 6
    assert total["energy_j"] == pytest.approx(math.fsum(windows), rel=1e-12)
    assert total["co2e_kg"] == pytest.approx(total["energy_j"] / 3.6e6 * 400 / 1000, rel=1e-12)
    line = next(s for s in lines if s.startswith("energy: "))
    assert ("measured" if total["energy_measured"] else "estimated") in line
