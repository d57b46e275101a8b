"""Pipeline layouts through the trainer: each schedule at pp=2, and pp combined with FSDP2 and
TP (with and without sequence parallel; up to pp x tp x dp_shard on 8 ranks), reach the
single-process per-step losses (1e-5 relative), validation loss and final weights (1e-4)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.cli import read_metrics, tiny_run_args, train_in_process, train_ranks
from tests.helpers.parity import WEIGHT_PARITY, assert_same_final_weights

STEPS = 5
# Four layers, so V and interleaved schedules get one layer per stage.
COMMON = ["--model.n_layers", "4", "--train.steps", str(STEPS), "--train.global_batch_size", "8",
          "--train.eval_interval", "5", *WEIGHT_PARITY]


def per_step(run_dir: Path, prefix: str = "train") -> list[float]:
    rows = read_metrics(run_dir, prefix)
    return [r["loss"] for r in rows]


@pytest.fixture(scope="module")
def reference_dir(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("pp-ref")
    train_in_process(tiny_run_args(tiny_data_dir, run, *COMMON, "--train.micro_batch_size", "8"))
    assert len(per_step(run)) == STEPS
    return run


def assert_matches(reference_dir: Path, run: Path, name: str) -> None:
    ref, got = per_step(reference_dir), per_step(run)
    assert len(got) == STEPS and ref[-1] < ref[0]
    for step, (a, b) in enumerate(zip(ref, got), start=1):
        assert abs(a - b) <= 1e-5 * abs(a), f"{name} step {step}: {a} vs {b}"
    (va,), (vb,) = per_step(reference_dir, "val"), per_step(run, "val")
    assert abs(va - vb) <= 1e-5 * abs(va), f"{name} validation: {va} vs {vb}"
    assert_same_final_weights(reference_dir, run, name)


SCHEDULES = ["gpipe", "1f1b", "interleaved_1f1b", "looped_bfs", "interleaved_zb", "zbv", "dualpipev"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_pp2_schedule_matches_single_process(schedule: str, tiny_data_dir: Path, tmp_path: Path,
                                             reference_dir: Path) -> None:
    micro = "4" if schedule == "dualpipev" else "2"
    train_ranks(tiny_run_args(tiny_data_dir, tmp_path, *COMMON, "--parallel.pp", "2",
                              "--parallel.dp_shard", "1", "--parallel.pp_schedule", schedule,
                              "--parallel.pp_microbatches", micro, "--train.micro_batch_size", "4"),
                nproc=2)
    assert_matches(reference_dir, tmp_path, schedule)


COMBINED = {
    "pp2-x-fsdp2": (4, ["--parallel.pp", "2", "--parallel.dp_shard", "2", "--train.micro_batch_size", "2"]),
    "pp2-x-tp2": (4, ["--parallel.pp", "2", "--parallel.tp", "2", "--parallel.dp_shard", "1",
                      "--parallel.sequence_parallel", "false", "--train.micro_batch_size", "4"]),
    # Sequence parallel: the stages exchange the (batch, seq / tp, dim) shard of the residual stream.
    "pp2-x-tp2-sp-1f1b": (4, ["--parallel.pp", "2", "--parallel.tp", "2", "--parallel.dp_shard", "1",
                              "--parallel.pp_schedule", "1f1b", "--train.micro_batch_size", "4"]),
    "pp2-x-tp2-sp-interleaved_zb": (4, ["--parallel.pp", "2", "--parallel.tp", "2", "--parallel.dp_shard", "1",
                                        "--parallel.pp_schedule", "interleaved_zb", "--train.micro_batch_size", "4"]),
    "pp2-x-tp2-x-fsdp2": (8, ["--parallel.pp", "2", "--parallel.tp", "2", "--parallel.dp_shard", "2",
                              "--parallel.sequence_parallel", "false", "--train.micro_batch_size", "2"]),
}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(COMBINED))
def test_pp_combined_layouts_match_single_process(layout: str, tiny_data_dir: Path, tmp_path: Path,
                                                  reference_dir: Path) -> None:
    nproc, extra = COMBINED[layout]
    train_ranks(tiny_run_args(tiny_data_dir, tmp_path, *COMMON, *extra), nproc=nproc, timeout=600)
    assert_matches(reference_dir, tmp_path, layout)


@pytest.mark.slow
@pytest.mark.distributed
def test_pp2_1f1b_compiled_matches_eager(tiny_data_dir: Path, tmp_path: Path, reference_dir: Path) -> None:
    """torch.compile per block on the pipeline stages; the single-process compile test's tolerance."""
    steps = 3  # compile is 15-20 s cold per process
    train_ranks(tiny_run_args(tiny_data_dir, tmp_path, *COMMON, "--parallel.pp", "2",
                              "--parallel.dp_shard", "1", "--parallel.pp_schedule", "1f1b",
                              "--parallel.pp_microbatches", "2", "--train.micro_batch_size", "4",
                              "--train.compile", "true", "--train.stop_at", str(steps)),
                nproc=2, timeout=600)
    assert per_step(tmp_path) == pytest.approx(per_step(reference_dir)[:steps], rel=1e-4)
    # Final weights against one eager process stopped at the same step (the eager layouts' 1e-4).
    eager = tmp_path.parent / f"{tmp_path.name}-eager"
    train_in_process(tiny_run_args(tiny_data_dir, eager, *COMMON, "--train.micro_batch_size", "8",
                                   "--train.stop_at", str(steps)))
    assert_same_final_weights(eager, tmp_path, "pp2-1f1b-compile")
