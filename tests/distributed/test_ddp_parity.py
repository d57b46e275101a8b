"""DDP parity: 2 gloo ranks under torchrun reach the same per-step losses as one process with the
same global batch (and as one process with gradient accumulation)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import read_metrics, run_cli, tiny_run_args

STEPS = 6


def per_step(run_dir: Path) -> list[float]:
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return [r["loss"] for r in rows]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_ddp_matches_single_process(tiny_data_dir: Path, tmp_path: Path) -> None:
    common = ["--train.steps", str(STEPS), "--train.global_batch_size", "8", "--train.eval_interval", "0",
              "--checkpoint.enabled", "false"]
    single = tmp_path / "single"
    run_cli(["train", *tiny_run_args(tiny_data_dir, single, *common, "--train.micro_batch_size", "8")])
    accum = tmp_path / "accum"
    run_cli(["train", *tiny_run_args(tiny_data_dir, accum, *common, "--train.micro_batch_size", "2")])
    ddp = tmp_path / "ddp"
    run_cli(["train", *tiny_run_args(tiny_data_dir, ddp, *common, "--train.micro_batch_size", "4")], nproc=2)

    ref = per_step(single)
    assert ref[-1] < ref[0]
    for name, run in (("accumulation", accum), ("ddp", ddp)):
        for step, (a, b) in enumerate(zip(ref, per_step(run)), start=1):
            assert abs(a - b) <= 1e-5 * abs(a), f"{name} step {step}: {a} vs {b}"
