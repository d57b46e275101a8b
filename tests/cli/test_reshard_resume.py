"""A checkpoint saved under one parallel layout resumes under another (DCP reshards), and training
continues with the losses the uninterrupted single-process run has."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers.cli import read_metrics, tiny_run_args, train_in_process, train_ranks

COMMON = ["--train.steps", "8", "--train.global_batch_size", "8", "--train.eval_interval", "0",
          "--checkpoint.interval", "4"]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run)}


@pytest.fixture(scope="module")
def straight(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    run = tmp_path_factory.mktemp("straight")
    train_in_process(tiny_run_args(tiny_data_dir, run, *COMMON, "--train.micro_batch_size", "8"))
    return losses(run)


PP2 = ["--parallel.pp", "2", "--parallel.dp_shard", "1", "--parallel.pp_microbatches", "2",
       "--train.micro_batch_size", "4"]

LAYOUT_CHANGES = {
    # name: (first nproc, first layout, second nproc, second layout)
    "fsdp2->single": (2, ["--train.micro_batch_size", "4"], 1, ["--train.micro_batch_size", "8"]),
    "single->fsdp2": (1, ["--train.micro_batch_size", "8"], 2, ["--train.micro_batch_size", "4"]),
    "fsdp2xtp2->fsdp2": (4, ["--parallel.tp", "2", "--parallel.dp_shard", "2", "--train.micro_batch_size", "4"],
                         2, ["--train.micro_batch_size", "4"]),
    "fsdp2xtp2->single": (4, ["--parallel.tp", "2", "--parallel.dp_shard", "2", "--train.micro_batch_size", "4"],
                          1, ["--train.micro_batch_size", "8"]),
    "ddp2->hsdp2x2": (2, ["--parallel.dp_replicate", "2", "--parallel.dp_shard", "1", "--train.micro_batch_size", "4"],
                      4, ["--parallel.dp_replicate", "2", "--parallel.dp_shard", "2", "--train.micro_batch_size", "2"]),
    # Pipeline stages hold different parameters in "the same" optimizer param group: the groups
    # must be saved per parameter, or the stages exchange hyperparameters (or fail to load).
    "pp2->single": (2, PP2, 1, ["--train.micro_batch_size", "8"]),
    "single->pp2": (1, ["--train.micro_batch_size", "8"], 2, PP2),
}


@pytest.fixture(scope="module")
def first_half(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[int, list[str]], Path]:
    """Steps 1-4 under a layout, stopped with its step-4 checkpoint: trained once per layout (two
    changes start from one process, two from fsdp2 x tp2), copied by each change that resumes from
    it. One process trains in this process; every resume below is a fresh process."""
    runs: dict[tuple[int, tuple[str, ...]], Path] = {}

    def get(nproc: int, layout: list[str]) -> Path:
        key = (nproc, tuple(layout))
        if key not in runs:
            run = tmp_path_factory.mktemp("first-half")
            args = tiny_run_args(tiny_data_dir, run, *COMMON, *layout, "--train.stop_at", "4")
            if nproc == 1:
                train_in_process(args)
            else:
                train_ranks(args, nproc=nproc)
            runs[key] = run
        return runs[key]

    return get


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("change", list(LAYOUT_CHANGES))
def test_resume_under_another_layout(change: str, tiny_data_dir: Path, tmp_path: Path,
                                     straight: dict[int, float], first_half: Callable[[int, list[str]], Path]) -> None:
    n1, layout1, n2, layout2 = LAYOUT_CHANGES[change]
    shutil.copytree(first_half(n1, layout1), tmp_path, dirs_exist_ok=True)
    proc = train_ranks(tiny_run_args(tiny_data_dir, tmp_path, *COMMON, *layout2,
                                     "--checkpoint.resume", "auto"), nproc=n2)
    assert "resumed from" in proc.stdout and "step-00000004" in proc.stdout
    got = losses(tmp_path)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert abs(got[step] - straight[step]) <= 1e-5 * abs(straight[step]), f"{change} step {step}"


@pytest.mark.slow
@pytest.mark.distributed
def test_pp2_resumes_its_own_checkpoint_exactly(tiny_data_dir: Path, tmp_path: Path) -> None:
    """A pp=2 run stopped after step 3 and resumed by pp=2 continues with the losses and gradient
    norms of the uninterrupted pp=2 run (same layout, same arithmetic: 1e-6 relative)."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    args = [*COMMON, *PP2, "--checkpoint.interval", "3"]
    train_ranks(tiny_run_args(tiny_data_dir, whole, *args), nproc=2)
    train_ranks(tiny_run_args(tiny_data_dir, parts, *args, "--train.stop_at", "3"), nproc=2)
    proc = train_ranks(tiny_run_args(tiny_data_dir, parts, *args, "--checkpoint.resume", "auto"), nproc=2)
    assert "resumed from" in proc.stdout and "step-00000003" in proc.stdout
    want = {r["step"]: r for r in read_metrics(whole)}
    got = {r["step"]: r for r in read_metrics(parts)}
    assert sorted(got) == sorted(want) == list(range(1, 9))
    for step in range(4, 9):
        for key in ("loss", "grad_norm"):
            a, b = want[step][key], got[step][key]
            assert abs(a - b) <= 1e-6 * abs(a), f"pp2 resumed step {step} {key}: {b} vs uninterrupted {a}"
