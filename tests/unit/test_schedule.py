"""Learning-rate schedules and optimizer parameter groups."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.config import ModelConfig, OptimizerConfig, SchedulerConfig
from lmforge.models.llama import build_model
from lmforge.train.lr_schedule import build_scheduler, lr_multiplier
from lmforge.train.optim import build_optimizer


def test_cosine_warmup_then_decay_to_floor() -> None:
    f = lr_multiplier(SchedulerConfig(kind="cosine", warmup_steps=10, min_lr_ratio=0.1), total_steps=110)
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert f(110) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_wsd_stable_then_linear_decay() -> None:
    f = lr_multiplier(SchedulerConfig(kind="wsd", warmup_steps=5, decay_fraction=0.2, min_lr_ratio=0.0), 100)
    assert f(2) == pytest.approx(0.6)
    assert all(f(s) == 1.0 for s in range(5, 80))
    assert f(90) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)


def test_constant_after_warmup() -> None:
    f = lr_multiplier(SchedulerConfig(kind="constant", warmup_steps=4), 50)
    assert [f(s) for s in (0, 3, 4, 49)] == [0.25, 1.0, 1.0, 1.0]


def test_scheduler_state_round_trip_continues_identically() -> None:
    p = torch.nn.Parameter(torch.zeros(2))
    mk = lambda: torch.optim.SGD([p], lr=1.0)  # noqa: E731
    cfg = SchedulerConfig(kind="cosine", warmup_steps=3)
    a_opt = mk()
    a = build_scheduler(a_opt, cfg, 20)
    for _ in range(7):
        a_opt.step()
        a.step()
    b_opt = mk()
    b = build_scheduler(b_opt, cfg, 20)
    b.load_state_dict(a.state_dict())
    for _ in range(5):
        a_opt.step()
        a.step()
        b_opt.step()
        b.step()
        assert a.get_last_lr() == b.get_last_lr()
    assert not math.isclose(a.get_last_lr()[0], 1.0)


def test_weight_decay_only_on_matrices() -> None:
    model = build_model(ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=64, multiple_of=16, max_seq_len=16))
    opt = build_optimizer(model, OptimizerConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
