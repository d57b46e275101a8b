"""`lmforge eval`'s perplexity (lmforge/eval/perplexity.py) against the trainer: on the same run and
data its validation figure is exp of the trainer's logged validation loss (fp32, 1e-5 relative),
with gradient accumulation and a capped evaluation too; the per-domain figures add up to the
overall one; two evaluations give identical deterministic sections."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lmforge.config import load_job_config, parse_override_args
from lmforge.eval.runner import EvalOptions, evaluate
from lmforge.train.trainer import Trainer
from tests.helpers.cli import read_metrics, tiny_run_args

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval-run")
    # micro-batch 2 of a global 4 (gradient accumulation in the evaluation too), 3 eval batches
    args = tiny_run_args(tiny_data_dir, out, "--train.steps", "6", "--train.global_batch_size", "4",
                         "--train.micro_batch_size", "2", "--train.eval_interval", "3", "--train.eval_batches", "3",
                         "--checkpoint.interval", "3")
    trainer = Trainer(load_job_config(None, parse_override_args(args)), echo=False)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return out


def test_perplexity_is_exp_of_the_trainers_validation_loss(run_dir: Path, tiny_data_dir: Path) -> None:
    logged = {r["step"]: r["loss"] for r in read_metrics(run_dir, "val")}
    assert set(logged) == {3, 6}
    notes: list[str] = []
    res = evaluate(run_dir, EvalOptions(items=0, speed=False), say=notes.append)
    assert res["source"]["step"] == 6 and res["timing"] is None and notes == []
    p = res["deterministic"]["perplexity"]
    v = p["validation"]
    assert v["windows"] == 3 * 4 and v["tokens"] == 3 * 4 * 32
    assert v["loss"] == pytest.approx(logged[6], rel=1e-5)
    assert v["perplexity"] == pytest.approx(math.exp(logged[6]), rel=1e-5)
    # an earlier checkpoint of the same run: its own logged loss
    older = evaluate(run_dir / "checkpoints" / "step-00000003", EvalOptions(items=0, speed=False))
    assert older["deterministic"]["perplexity"]["validation"]["loss"] == pytest.approx(logged[3], rel=1e-5)
    # the whole split is read; the domains' tokens and losses add up to it
    assert p["windows"] == p["windows_in_split"] and p["tokens"] == p["windows"] * 32
    doms = p["domains"]
    manifest = json.loads((tiny_data_dir / "manifest.json").read_text())
    assert sorted(doms) == sorted(d["name"] for d in manifest["splits"]["val"]["domain_counts"])
    assert sum(d["tokens"] for d in doms.values()) == p["tokens"]
    assert sum(d["loss"] * d["tokens"] for d in doms.values()) == pytest.approx(p["loss"] * p["tokens"], rel=1e-9)
    assert p["perplexity"] == pytest.approx(math.exp(p["loss"]), rel=1e-12)


def test_evaluating_twice_gives_identical_numbers(run_dir: Path) -> None:
    opts = EvalOptions(items=30, speed=False, max_batches=5)
    a, b = evaluate(run_dir, opts), evaluate(run_dir, opts)
    assert a["deterministic"] == b["deterministic"]
    assert a["deterministic"]["cloze"]["items"] == 30
    p = a["deterministic"]["perplexity"]
    assert p["windows"] == 5 * 4 and p["validation"]["windows"] == 12  # 5 batches read cover the trainer's 3


def test_fewer_batches_than_the_trainer_reads_drop_the_validation_figure(run_dir: Path) -> None:
    notes: list[str] = []
    res = evaluate(run_dir, EvalOptions(items=0, speed=False, max_batches=1), say=notes.append)
    p = res["deterministic"]["perplexity"]
    assert p["windows"] == 4 and "validation" not in p
    assert len(notes) == 1 and "no trainer-validation figure" in notes[0]
