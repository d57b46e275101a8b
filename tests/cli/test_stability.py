"""Stability policy end to end (`[stability]`, lmforge/train/stability.py), with faults injected
through LMFORGE_FAULTS: a NaN loss and a loss spike each skip their optimizer step (weights
unchanged by it, event in the metrics log); repeated spikes roll back to the checkpoint before
them and the loader skips the offending data; the fp16 GradScaler path keeps working."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lmforge.serve.generate import load_for_generation
from lmforge.train.trace import read_traces
from tests.helpers.cli import read_metrics, run_cli, tiny_run_args

COMMON = ["--train.global_batch_size", "4", "--train.micro_batch_size", "2", "--train.eval_interval", "0",
          "--stability.enabled", "true", "--stability.spike_min_history", "4", "--stability.spike_zscore", "6"]


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    model, _, _ = load_for_generation(run / "checkpoints" / f"step-{step:08d}")
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def events(run: Path) -> list[dict]:
    return read_metrics(run, "stability")


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_nan_and_spike_skip_the_step(precision: str, tiny_data_dir: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    nan_step, spike_step, steps = 3, 7, 8
    # fp16: a 20x loss at loss scale 2^14-2^15 overflows the fp16 gradients, which GradScaler
    # skips as an overflow before the spike check sees it; 4x is still a spike (z > 6) that fits
    factor = 4 if precision == "fp16" else 20
    monkeypatch.setenv("LMFORGE_FAULTS", json.dumps({"nan_steps": [nan_step], "spike_steps": [spike_step],
                                                     "spike_factor": factor}))
    args = tiny_run_args(tiny_data_dir, tmp_path, *COMMON, "--train.steps", str(steps), "--checkpoint.interval", "1",
                         "--checkpoint.keep_last", "20")
    if precision == "fp16":  # the last --train.mixed_precision wins
        args += ["--train.mixed_precision", "fp16"]
    proc = run_cli(["train", *args])
    assert "nonfinite" in proc.stdout and "spike" in proc.stdout

    ev = {e["step"]: e for e in events(tmp_path)}
    assert sorted(ev) == [nan_step, spike_step]
    assert ev[nan_step]["event_nonfinite"] == 1 and math.isnan(ev[nan_step]["loss"])
    assert ev[spike_step]["event_spike"] == 1 and ev[spike_step]["zscore"] > 6
    train = {r["step"]: r for r in read_metrics(tmp_path)}
    assert train[steps]["skipped_nonfinite"] == 1 and train[steps]["skipped_spikes"] == 1
    assert train[steps]["rollbacks"] == 0
    assert all(math.isfinite(train[s]["loss"]) for s in train if s != nan_step)
    # A skipped step leaves the weights as they were; a normal step changes them.
    for bad in (nan_step, spike_step):
        assert same(weights(tmp_path, bad - 1), weights(tmp_path, bad)), f"step {bad} changed the weights"
        assert not same(weights(tmp_path, bad), weights(tmp_path, bad + 1))
    if precision == "fp16":
        # GradScaler saw the NaN gradients too and halved its scale at that step, then training went on.
        scale = {s: train[s]["loss_scale"] for s in train}
        assert scale[nan_step] == scale[nan_step - 1] / 2
        assert train[steps]["loss"] < train[1]["loss"]


@pytest.mark.slow
def test_repeated_spikes_roll_back_and_skip_the_offending_data(tiny_data_dir: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # Bad data: the batches at loader positions 36.., 40.., 44.. (steps 10, 11, 12) spike whenever read.
    monkeypatch.setenv("LMFORGE_FAULTS", json.dumps({"spike_positions": [36, 40, 44], "spike_factor": 20}))
    proc = run_cli(["train", *tiny_run_args(tiny_data_dir, tmp_path, *COMMON, "--train.steps", "14",
                                            "--checkpoint.interval", "4", "--checkpoint.keep_last", "3",
                                            "--stability.max_consecutive_spikes", "3", "--train.trace_samples",
                                            "true")])
    assert "rolled back to" in proc.stdout and "step-00000008" in proc.stdout

    ev = events(tmp_path)
    kinds = [(e["step"], next(k for k in e if k.startswith("event_") or k == "rollback_to_step")) for e in ev]
    assert kinds == [(10, "event_spike"), (11, "event_spike"), (12, "event_rollback"), (10, "rollback_to_step")]
    assert ev[-1]["rollback_to_step"] == 8 and ev[-1]["skipped_from_position"] == 32
    assert ev[-1]["skipped_samples"] == 16  # steps 9-12's data: what led to the spikes, and the spikes
    train = {r["step"]: r for r in read_metrics(tmp_path)}  # last record per step
    assert sorted(train) == list(range(1, 15)) and train[14]["rollbacks"] == 1
    assert all(train[s]["loss"] < 10 for s in train)  # no spike survives in the run's history
    # The trace (the run's effective history) has steps 1-8 on positions 0-31, then 9-14 on 48-71.
    positions = sorted(p for r in read_traces(tmp_path) for p in r["positions"])
    assert positions == list(range(32)) + list(range(48, 72))
    assert sorted(r["step"] for r in read_traces(tmp_path)) == list(range(1, 15))
