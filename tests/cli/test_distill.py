"""`lmforge distill` end to end: a teacher trained by `lmforge train`, a student half its depth
distilled in one process and on two gloo ranks (FSDP2 through `--nproc 2`, DDP under torchrun): the
same per-step losses (1e-5 relative) and final weights (1e-4); a teacher with another vocabulary
refused before any work in one line, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.cli import REPO, read_metrics, run_cli, tiny_run_args, train_in_process
from tests.helpers.parity import WEIGHT_PARITY, assert_same_final_weights, library_warnings

STEPS = 4
STUDENT = ["--model.n_layers", "1", "--train.steps", str(STEPS), "--train.global_batch_size", "4",
           "--train.micro_batch_size", "2", "--train.eval_interval", "0", "--distill.alpha", "0.7",
           *WEIGHT_PARITY]


@pytest.fixture(scope="module")
def teacher_dir(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    train_in_process(tiny_run_args(tiny_data_dir, out, "--train.steps", "6", "--train.eval_interval", "0"))
    return out


def per_step(run_dir: Path, key: str) -> list[float]:
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return [r[key] for r in rows]


@pytest.fixture(scope="module")
def single(teacher_dir: Path, tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single")
    proc = run_cli(["distill", *tiny_run_args(tiny_data_dir, out, *STUDENT), "--teacher", str(teacher_dir)])
    assert library_warnings(proc.stderr) == []
    return out


def test_distill_logs_its_parts_and_the_teacher(single: Path, teacher_dir: Path) -> None:
    rows = read_metrics(single)
    for r in rows:  # alpha 0.7, T 2
        assert r["loss"] == pytest.approx(0.7 * 4 * r["distill_kl"] + 0.3 * r["distill_ce"], rel=1e-6)
    assert rows[-1]["loss"] < rows[0]["loss"]
    cfg = json.loads((single / "config.json").read_text())["distill"]
    assert cfg["teacher"] == str(teacher_dir)
    assert cfg["teacher_resolved"] == str(teacher_dir / "checkpoints" / "step-00000006")


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["fsdp", pytest.param("ddp", marks=pytest.mark.slow)])
def test_two_ranks_match_one(layout: str, single: Path, teacher_dir: Path, tiny_data_dir: Path,
                             tmp_path: Path) -> None:
    args = ["distill", *tiny_run_args(tiny_data_dir, tmp_path, *STUDENT), "--teacher", str(teacher_dir)]
    if layout == "fsdp":  # `lmforge distill --nproc 2`: the launcher checks the teacher, then torchrun
        proc = run_cli([*args, "--nproc", "2"])
    else:  # torchrun started directly, every rank through `lmforge distill`
        proc = run_cli([*args, "--parallel.dp_replicate", "2", "--parallel.dp_shard", "1"], nproc=2)
    assert library_warnings(proc.stderr) == []
    mesh = json.loads((tmp_path / "memory" / "rank1.json").read_text())["mesh"]
    assert mesh["dp_shard" if layout == "fsdp" else "dp_replicate"] == 2
    for key in ("loss", "distill_kl", "distill_ce"):
        for step, (a, b) in enumerate(zip(per_step(single, key), per_step(tmp_path, key)), start=1):
            assert abs(a - b) <= 1e-5 * abs(a), f"{layout} {key} step {step}: {a} vs {b}"
    assert_same_final_weights(single, tmp_path, layout)


def test_teacher_with_another_vocabulary_is_refused(teacher_dir: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "lmforge", "distill", *tiny_run_args(tiny_data_dir, tmp_path / "s", *STUDENT),
           "--model.vocab_size", "640", "--teacher", str(teacher_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("lmforge distill: config error") and "distill.teacher" in lines[0]
    assert "512 ids" in lines[0] and "640" in lines[0]
    assert not (tmp_path / "s").exists()  # refused before any work
