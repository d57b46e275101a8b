"""Each rank's AdamW moments before the compression (`comm.adam_moments = "local"`:
lmforge/parallel/comm/local_moments.py, lmforge/train/local_moments_adamw.py), on a world of one
gloo rank: with an exact payload it is torch's AdamW (lr schedule and weight decay included); with
top-k the applied updates plus the residual are exactly the dense updates (error feedback, the lr
inside); a restored state continues bit for bit across the warm-up switch; checkpoints of the
other mode and the combinations that would let the replicas drift are refused in one line."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lmforge.config import JobConfig
from lmforge.config.comm import CommConfig
from lmforge.config.loader import ConfigError
from lmforge.parallel.comm.compressors import TopKCompressor, build_compressor
from lmforge.parallel.comm.ddp_hooks import CompressionHook, parameter_names
from lmforge.parallel.comm.local_moments import LocalMomentsExchange
from lmforge.train.continual import Unfreezing
from lmforge.train.local_moments_adamw import LocalMomentsAdamW

pytestmark = pytest.mark.usefixtures("one_thread")

LRS = (3e-3, 2e-3, 1e-3, 5e-4, 2.5e-4, 1e-4)  # a decaying schedule: the lr of each step, in turn


@pytest.fixture(scope="module")
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 64), nn.LayerNorm(64), nn.Linear(64, 300))


def _groups(model: nn.Module, weight_decay: float) -> list[dict]:
    params = list(model.parameters())
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def _set_grads(model: nn.Module, step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * (1 + step)


def _local(model: nn.Module, group, compressor, weight_decay: float = 0.1, warmup=None,
           warmup_steps: int = 0) -> tuple[LocalMomentsExchange, LocalMomentsAdamW]:
    exchange = LocalMomentsExchange(compressor, group, parameter_names(model), warmup=warmup,
                                    warmup_steps=warmup_steps)
    opt = LocalMomentsAdamW(_groups(model, weight_decay), exchange, lr=LRS[0], betas=(0.9, 0.95), eps=1e-8)
    return exchange, opt


def _step(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    for group in opt.param_groups:
        group["lr"] = LRS[step % len(LRS)]
    _set_grads(model, step)
    opt.step()


def test_with_an_exact_payload_it_is_torch_adamw(one_rank_group) -> None:
    ours, ref = _model(), _model()
    _, opt = _local(ours, one_rank_group, TopKCompressor(1.0))  # every value, fp32: nothing dropped
    adamw = torch.optim.AdamW(_groups(ref, 0.1), lr=LRS[0], betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for step in range(len(LRS)):
        _step(ours, opt, step)
        _step(ref, adamw, step)
    for a, b, start in zip(ours.parameters(), ref.parameters(), _model().parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
        assert (a - start).abs().max() > 1e-3  # they moved


def test_topk_applied_updates_plus_residual_equal_the_dense_updates(one_rank_group) -> None:
    """The moments see the gradients only (not the compression), so a dense run's applied sum is
    what top-k's error feedback must account for: applied + held back == made, lr for lr."""
    dense_model, sparse_model = _model(), _model()
    _, dense = _local(dense_model, one_rank_group, TopKCompressor(1.0), weight_decay=0.0)
    exchange, sparse = _local(sparse_model, one_rank_group, TopKCompressor(0.05), weight_decay=0.0)
    with torch.no_grad():  # from zero, the weights are the applied sums, not rounded against 1.0
        for p in [*dense_model.parameters(), *sparse_model.parameters()]:
            p.zero_()
    start = {n: p.detach().clone() for n, p in sparse_model.named_parameters()}
    for step in range(len(LRS)):
        _step(dense_model, dense, step)
        _step(sparse_model, sparse, step)
    for (name, p), q in zip(sparse_model.named_parameters(), dense_model.parameters()):
        applied = start[name] - p.detach()
        made = start[name] - q.detach()
        torch.testing.assert_close(applied + exchange.residuals[name].view_as(p), made, rtol=1e-5, atol=1e-9)
        assert exchange.residuals[name].abs().max() > 0, name  # something was held back
    sent_all = (start["2.weight"] - sparse_model[2].weight.detach()) != 0
    assert 0 < sent_all.float().mean() < 0.5  # at 5% a step over 6 steps, most coordinates never moved


def test_without_error_feedback_nothing_is_held_back(one_rank_group) -> None:
    model = _model()
    exchange = LocalMomentsExchange(TopKCompressor(0.05), one_rank_group, parameter_names(model), error_feedback=False)
    opt = LocalMomentsAdamW(_groups(model, 0.0), exchange, lr=LRS[0], betas=(0.9, 0.95), eps=1e-8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(2):
        _step(model, opt, step)
    assert exchange.residuals == {}
    moved = (model[2].weight.detach() != before["2.weight"]).float().mean()
    assert 0 < moved <= 0.1  # 5% a step, two steps


def test_restored_state_continues_bit_for_bit_across_the_warmup_switch(one_rank_group) -> None:
    cfg = CommConfig(compression="topk", topk_fraction=0.05, topk_payload="compact", warmup_steps=2)

    def build(model: nn.Module) -> tuple[LocalMomentsExchange, LocalMomentsAdamW]:
        return _local(model, one_rank_group, build_compressor(cfg), warmup=build_compressor(cfg, "int4"),
                      warmup_steps=cfg.warmup_steps)

    straight = _model()
    exchange, opt = build(straight)
    for step in range(3):  # two int4 steps, one top-k step
        _step(straight, opt, step)
    saved = ({k: v.clone() for k, v in straight.state_dict().items()}, exchange.state_dict(), copy.deepcopy(opt.state_dict()))
    for step in range(3, 6):
        _step(straight, opt, step)
    resumed = _model()
    resumed.load_state_dict(saved[0])
    exchange2, opt2 = build(resumed)
    exchange2.load_state_dict(saved[1])
    opt2.load_state_dict(saved[2])
    assert exchange2.steps == 3 and int(opt2.state[next(resumed.parameters())]["step"]) == 3
    for step in range(3, 6):
        _step(resumed, opt2, step)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for name, r in exchange.residuals.items():
        assert torch.equal(r, exchange2.residuals[name]), name


def test_a_checkpoint_of_the_other_mode_is_refused_in_one_line(one_rank_group) -> None:
    model = _model()
    exchange, _ = _local(model, one_rank_group, TopKCompressor(0.05))
    hook = CompressionHook(TopKCompressor(0.05), one_rank_group, parameter_names(model))
    with pytest.raises(ValueError, match=r"^its comm state was saved with comm.adam_moments = "
                                         r"'global' .*resume it with 'global'"):
        exchange.load_state_dict(hook.state_dict())
    with pytest.raises(ValueError, match=r"^its comm state was saved with comm.adam_moments = "
                                         r"'local' .*resume it with 'local'"):
        hook.load_state_dict(exchange.state_dict())


def test_gradual_unfreezing_does_not_step_the_exchange(one_rank_group) -> None:
    """Unfreezing.start makes AdamW's state with one lr-0 step; this optimizer's state exists from
    the start, and such a step would count as the warm-up's first exchange (and send bytes)."""
    model = _model()
    exchange, opt = _local(model, one_rank_group, TopKCompressor(0.05))
    Unfreezing.start(SimpleNamespace(describe=lambda n_layers: "stages"), opt, lambda line: None, 2)
    assert exchange.steps == 0 and exchange.accounting.sent == 0
    assert all(int(opt.state[p]["step"]) == 0 for p in model.parameters())


def _ddp_job() -> JobConfig:
    cfg = JobConfig()
    cfg.train.global_batch_size, cfg.train.micro_batch_size = 8, 4
    cfg.parallel.dp_replicate, cfg.parallel.dp_shard = 2, 1
    cfg.comm.compression, cfg.comm.adam_moments = "topk", "local"
    return cfg


@pytest.mark.parametrize(("change", "message"), [
    (lambda c: setattr(c.comm, "compression", "powersgd"),
     r"comm.adam_moments = 'local': 'local' needs an element-wise comm.compression \(bf16, fp16, int8, int4, int2, "
     r"topk\), not 'powersgd'"),
    (lambda c: (setattr(c.comm, "warmup_steps", 3), setattr(c.comm, "adam_variance", "frozen")),
     r"comm.adam_moments = 'local': .* needs comm.adam_variance = 'adaptive', not 'frozen'"),
    (lambda c: setattr(c.train, "mixed_precision", "fp16"),
     r"train.mixed_precision = 'fp16': is not supported with comm.adam_moments = 'local'"),
    (lambda c: setattr(c.comm, "load_balance", True), r"comm.load_balance = True: must be false with comm.adam_moments"),
    (lambda c: setattr(c.stability, "enabled", True), r"stability.enabled = True: must be false with comm.adam_moments"),
    (lambda c: (setattr(c.comm, "compression", "bf16"), setattr(c.parallel, "dp_replicate", 1),
                setattr(c.parallel, "dp_shard", 2)),
     r"parallel.dp_shard = 2: must be 1 with comm.adam_moments = 'local'"),
])
def test_config_refuses_what_would_let_the_replicas_drift(change, message: str) -> None:
    cfg = _ddp_job()
    cfg.validate(2)  # the plain case passes
    change(cfg)
    with pytest.raises(ConfigError, match=message):
        cfg.validate(2)
