"""Checkpoint tiers and storage modes through `lmforge train` (fp32, CPU):

- a run with async saves and both tiers (memory snapshot every 2 steps, durable only at the end)
  is killed with SIGKILL mid-run; `--checkpoint.resume auto` takes the newest memory snapshot and
  the per-step losses equal the uninterrupted run's bit for bit;
- resuming from a checkpoint with int8 / bf16 optimizer moments gives losses within a stated
  tolerance of the exact resume (the weights are restored exactly; only Adam's moments are rounded).

Every run here trains on one intra-op thread, the killed subprocess's OMP_NUM_THREADS=1 included:
bit-equal losses need the same reduction order, and on AVX2 code paths (measured with torch, MKL
and oneDNN capped at AVX2) one and two threads give losses that part at step 3 by ~3e-6.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmforge.checkpoint.tiers import memory_root
from tests.helpers.cli import REPO, read_metrics, tiny_run_args, train_in_process

STEPS = 12
COMMON = ["--train.steps", str(STEPS), "--train.global_batch_size", "2", "--train.micro_batch_size", "2",
          "--train.eval_interval", "0", "--checkpoint.interval", "100"]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}  # a rerun step: its last value


@pytest.fixture(scope="module")
def straight(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    run = tmp_path_factory.mktemp("straight")
    train_in_process(tiny_run_args(tiny_data_dir, run, *COMMON))
    return losses(run)


@pytest.mark.slow
def test_killed_run_resumes_from_memory_snapshot_bit_identical(tiny_data_dir: Path, tmp_path: Path,
                                                               straight: dict[int, float], capsys) -> None:
    run, shm = tmp_path / "run", tmp_path / "shm"
    tiers = ["--checkpoint.memory_interval", "2", "--checkpoint.memory_dir", str(shm),
             "--checkpoint.async_mode", "async", "--checkpoint.memory_keep", "2"]
    args = ["train", *tiny_run_args(tiny_data_dir, run, *COMMON, *tiers)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    snapshots = memory_root(shm, run)
    deadline = time.monotonic() + 120
    while not (snapshots / "step-00000004").is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, out[-3000:]
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").glob("step-*[0-9]"))
    killed_at = max(losses(run))
    assert killed_at < STEPS

    train_in_process(tiny_run_args(tiny_data_dir, run, *COMMON, *tiers, "--checkpoint.resume", "auto"))
    assert f"resumed from {snapshots}/step-" in capsys.readouterr().out
    got = losses(run)
    assert sorted(got) == sorted(straight)
    assert all(got[s] == straight[s] for s in straight), {s: (got[s], straight[s]) for s in straight}
    stats = read_metrics(run, "ckpt")
    assert any(r["memory_tier"] == 1 for r in stats) and all(0 <= r["stall_s"] <= r["total_s"] for r in stats)
    assert not snapshots.exists()  # a finished run frees its memory tier


@pytest.mark.slow
@pytest.mark.parametrize("mode, tol", [("int8", 2e-3), ("bf16", 2e-3)])
def test_resume_from_lossy_optimizer_states_stays_close(tiny_data_dir: Path, tmp_path: Path,
                                                        straight: dict[int, float], mode: str, tol: float,
                                                        capsys) -> None:
    run = tmp_path / mode
    lossy = ["--checkpoint.optimizer_states", mode, "--checkpoint.quant_block", "64"]
    train_in_process(tiny_run_args(tiny_data_dir, run, *COMMON, *lossy, "--train.stop_at", "4"))
    train_in_process(tiny_run_args(tiny_data_dir, run, *COMMON, *lossy, "--checkpoint.resume", "auto"))
    got = losses(run)
    assert all(got[s] == straight[s] for s in range(1, 5))  # before the resume: the same run
    diffs = {s: abs(got[s] - straight[s]) / straight[s] for s in range(5, STEPS + 1)}
    with capsys.disabled():
        print(f"\noptimizer_states={mode}: max relative loss change after resume {max(diffs.values()):.2e}")
    assert max(diffs.values()) < tol, diffs
    assert max(diffs.values()) > 0  # the moments really were rounded
