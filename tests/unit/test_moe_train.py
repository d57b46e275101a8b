"""MoE through the trainer (in-process, debug-sized, fp32): router losses join the loss (also under
activation checkpointing, exactly), per-layer load metrics are logged, the balancing bias is
checkpointed state (a resumed run continues bit for bit), and unsupported layouts are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmforge.config import load_job_config, parse_override_args
from lmforge.train.trainer import Trainer
from tests.helpers.cli import read_metrics, tiny_run_args

MOE = ["--model.moe.n_experts", "4", "--model.moe.top_k", "2", "--model.moe.expert_hidden", "32",
       "--model.moe.first_k_dense", "1", "--model.moe.aux_loss_coef", "0.01", "--model.moe.z_loss_coef", "0.001",
       "--model.moe.bias_update_rate", "0.01"]


def config(data_dir: Path, out: Path, *extra: str):
    args = tiny_run_args(data_dir, out, "--train.steps", "4", "--train.global_batch_size", "4",
                         "--train.micro_batch_size", "2", "--train.eval_interval", "0", *MOE, *extra)
    return load_job_config(None, parse_override_args(args))


def train(cfg) -> tuple[list[float], Trainer]:
    trainer = Trainer(cfg, echo=False)
    try:
        return trainer.fit(), trainer
    finally:
        trainer.close()


@pytest.fixture(scope="module")
def reference(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("moe_ref")
    losses, trainer = train(config(tiny_data_dir, out, "--checkpoint.interval", "2"))
    return out, losses, trainer


def test_moe_trains_and_logs_load(reference) -> None:
    out, losses, trainer = reference
    assert len(losses) == 4 and losses[-1] < losses[0]
    rows = read_metrics(out)
    last = rows[-1]
    # layer 0 is dense; layer 1 is MoE: 4 experts x (2 micro-batches' last one: 2 seqs x 32 tokens x top 2)
    assert "moe0_load_cv" not in last
    assert sum(last[f"moe1_tokens_e{j}"] for j in range(4)) == 2 * 32 * 2
    assert last["moe1_dropped"] == 0 and last["moe1_aux_loss"] >= 1.0 and last["moe1_z_loss"] > 0
    assert last["moe_load_cv"] == last["moe1_load_cv"] >= 0
    bias = trainer.model.layers["1"].feed_forward.router.expert_bias
    assert bias.abs().sum() > 0 and bias.sum().abs() < 0.04 + 1e-6  # moved, in +-rate steps


def test_router_losses_are_in_the_loss_and_exact_under_activation_checkpointing(reference, tiny_data_dir: Path,
                                                                              tmp_path: Path) -> None:
    _, losses, _ = reference
    ac, _ = train(config(tiny_data_dir, tmp_path / "ac", "--train.activation_checkpointing", "full",
                         "--checkpoint.enabled", "false"))
    assert ac == pytest.approx(losses, rel=1e-6, abs=0)
    no_aux, _ = train(config(tiny_data_dir, tmp_path / "noaux", "--model.moe.aux_loss_coef", "0",
                             "--model.moe.z_loss_coef", "0", "--checkpoint.enabled", "false"))
    assert no_aux[0] == losses[0] and no_aux[-1] != losses[-1]  # same start, the router loss changed training


def test_resume_restores_expert_bias_bit_for_bit(reference, tiny_data_dir: Path, tmp_path: Path) -> None:
    _, losses, trainer = reference
    out = tmp_path / "split"
    first, _ = train(config(tiny_data_dir, out, "--checkpoint.interval", "2", "--train.stop_at", "2"))
    rest, resumed = train(config(tiny_data_dir, out, "--checkpoint.interval", "2", "--checkpoint.resume", "auto"))
    assert first + rest == losses
    for i in ("1",):
        assert torch.equal(resumed.model.layers[i].feed_forward.router.expert_bias,
                           trainer.model.layers[i].feed_forward.router.expert_bias)
