"""`lmforge train --train.init_from RUN` end to end: a checkpoint whose shapes differ from the recipe's
model, or a path that is no run, is one line and exit 2 (also from the `--nproc` launcher, before
torchrun starts); on 2 FSDP2 ranks a continual run (init_from + replay + gradual unfreezing) loads
the weights into the sharded model and trains as one process does, and layers no stage unfreezes
end bitwise equal to the run it started from."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.cli import read_metrics, run_process_group, tiny_run_args, train_in_process, train_ranks
from tests.helpers.parity import WEIGHT_PARITY

SMALL = ["--train.global_batch_size", "4", "--train.micro_batch_size", "2", "--train.eval_interval", "0"]


@pytest.fixture(scope="module")
def base(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("base")
    train_in_process(tiny_run_args(tiny_data_dir, out, *SMALL, "--train.steps", "2",
                                   "--data.domain_weights", "bible:1,shakespeare:1"))
    return out


def lmforge(*args: str, nproc: int | None = None):
    launch = ["--nproc", str(nproc)] if nproc else []
    return run_process_group([sys.executable, "-m", "lmforge", args[0], *launch, *args[1:]],
                             {**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)


@pytest.mark.parametrize("nproc", [None, 2])
def test_init_from_with_other_shapes_is_one_line(nproc: int | None, base: Path, tiny_data_dir: Path,
                                                 tmp_path: Path) -> None:
    proc = lmforge("train", *tiny_run_args(tiny_data_dir, tmp_path / "new", *SMALL, "--train.steps", "2",
                                           "--train.init_from", str(base), "--model.n_kv_heads", "4"), nproc=nproc)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "train.init_from" in lines[0] and "layers.0.attention.wk.weight has shape (32, 64)" in lines[0] \
        and "but (64, 64) in this recipe's model" in lines[0], lines[0]
    assert not (tmp_path / "new" / "checkpoints").exists()


def test_init_from_that_is_no_run_is_one_line(tiny_data_dir: Path, tmp_path: Path) -> None:
    proc = lmforge("train", *tiny_run_args(tiny_data_dir, tmp_path / "new", *SMALL, "--train.steps", "2",
                                           "--train.init_from", str(tmp_path / "missing")))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "train.init_from" in proc.stderr and "no such directory" in proc.stderr


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_continual_run_matches_one_process(base: Path, tiny_data_dir: Path, tmp_path: Path) -> None:
    from lmforge.checkpoint.weights import load_model_weights
    from lmforge.serve.generate import load_for_generation

    continual = [*SMALL, *WEIGHT_PARITY, "--train.steps", "4", "--train.init_from", str(base),
                 "--data.domain_weights", "chinese:1", "--data.replay_fraction", "0.25",
                 "--train.unfreeze", '[{step = 0, layers = "top:0"}, {step = 2, layers = "top:1", lr_scale = 0.5}]']
    train_in_process(tiny_run_args(tiny_data_dir, tmp_path / "one", *continual))
    proc = train_ranks(tiny_run_args(tiny_data_dir, tmp_path / "fsdp", *continual), nproc=2)
    assert "init_from " in proc.stdout and "replay 25%" in proc.stdout
    one = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "one")}
    two = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "fsdp")}
    assert sorted(two) == [1, 2, 3, 4] and two == pytest.approx(one, rel=1e-5)

    after, _, _ = load_for_generation(tmp_path / "fsdp")
    start, _, _ = load_for_generation(base)
    load_model_weights(base / "checkpoints" / "step-00000002", start)
    got, was = after.state_dict(), start.state_dict()
    frozen = [k for k in was if k.startswith(("layers.0.", "tok_embeddings."))]
    trained = [k for k in was if k.startswith(("layers.1.", "output.", "norm."))]
    assert frozen and all(torch.equal(got[k], was[k]) for k in frozen)  # no stage unfreezes them
    assert trained and all(not torch.equal(got[k], was[k]) for k in trained)
