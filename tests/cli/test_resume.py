"""Resume determinism: 2N steps straight == N steps, save, fresh process, resume, N steps (fp32, CPU),
bit for bit at every step; and `--resume auto` skips a corrupt newest checkpoint. The runs before a
resume train in this process (tests/helpers/cli.train_in_process); every resume is a fresh process."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.cli import read_metrics, run_cli, tiny_run_args, train_in_process

N = 4


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


@pytest.mark.slow
def test_resume_is_bit_identical(tiny_data_dir: Path, tmp_path: Path) -> None:
    common = ["--train.steps", str(2 * N), "--train.global_batch_size", "4", "--train.micro_batch_size", "2",
              "--train.eval_interval", "3", "--checkpoint.interval", "100"]
    straight = tmp_path / "straight"
    train_in_process(tiny_run_args(tiny_data_dir, straight, *common))

    split = tmp_path / "split"
    train_in_process(tiny_run_args(tiny_data_dir, split, *common, "--train.stop_at", str(N)))
    assert sorted(losses(split)) == list(range(1, N + 1))
    run_cli(["train", *tiny_run_args(tiny_data_dir, split, *common, "--checkpoint.resume", "auto")])

    a, b = losses(straight), losses(split)
    assert sorted(a) == list(range(1, 2 * N + 1)) and sorted(b) == sorted(a)
    for step in a:
        assert a[step] == b[step], f"step {step}: {a[step]!r} != {b[step]!r}"
    assert a[2 * N] < a[1]  # it trains
    # Validation losses after the resume are identical too.
    va = {r["step"]: r["loss"] for r in read_metrics(straight, "val")}
    vb = {r["step"]: r["loss"] for r in read_metrics(split, "val")}
    assert va == vb and len(va) >= 2


@pytest.mark.slow
def test_resume_auto_falls_back_past_corrupt_checkpoint(tiny_data_dir: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    common = ["--train.steps", "6", "--train.global_batch_size", "2", "--train.micro_batch_size", "2",
              "--train.eval_interval", "0", "--checkpoint.interval", "2", "--checkpoint.keep_last", "5"]
    train_in_process(tiny_run_args(tiny_data_dir, run, *common, "--train.stop_at", "4"))
    ckpts = sorted((run / "checkpoints").glob("step-*"))
    assert [c.name for c in ckpts] == ["step-00000002", "step-00000004"]
    # Truncate the largest data file of the newest checkpoint.
    newest = ckpts[-1]
    victim = max((p for p in newest.rglob("*") if p.is_file() and p.suffix == ".distcp"),
                 key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    proc = run_cli(["train", *tiny_run_args(tiny_data_dir, run, *common, "--checkpoint.resume", "auto")])
    assert "resumed from" in proc.stdout and "step-00000002" in proc.stdout
    steps = [r["step"] for r in read_metrics(run)]
    assert steps[-3:] == [4, 5, 6]  # steps 3..6 rerun after falling back to step 2

    # Asking explicitly for a corrupt checkpoint is refused with one clear line, exit code 2.
    flipped = bytearray(victim.read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF
    victim.write_bytes(bytes(flipped))
    from lmforge.cli import main
    code = main(["train", *tiny_run_args(tiny_data_dir, run, *common, "--checkpoint.resume", str(newest))])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "step-00000004" in err[0], err
