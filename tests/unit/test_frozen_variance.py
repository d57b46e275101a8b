"""The warm-up compressor (`comm.warmup_steps`) and `comm.adam_variance = "frozen"` (1-bit Adam for
top-k): FrozenVarianceAdamW is torch's AdamW bit for bit during the warm-up, then AdamW's formula
with the (floored, margined) second moment of the freeze step; the frozen update is linear, so a
spike that error feedback releases late moves a weight as far as the gradients it holds (AdamW's
does not); optimizer and hook state resume exactly; the hook runs the warm-up compressor for its
first steps, counts its bytes and the dense norm's, and picks top-k by the divisors it is given;
clipping by a given norm; the config's refusals."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lmforge.config import JobConfig, OptimizerConfig
from lmforge.config.comm import CommConfig
from lmforge.config.loader import ConfigError
from lmforge.parallel.comm.compressors import BlockQuantCompressor, TopKCompressor, build_compressor
from lmforge.parallel.comm.ddp_hooks import CompressionHook
from lmforge.train.frozen_adamw import FROZEN_MARGIN, VARIANCE_FLOOR, FrozenVarianceAdamW
from lmforge.train.optim import build_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = ((32, 16), (16,), (8, 32))
OPTS = {"lr": 1e-2, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}


def _params(seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _grads(step: int, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=g) * scale for s in SHAPES]


def _step(opt: torch.optim.Optimizer, params: list[nn.Parameter], grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()


@pytest.mark.parametrize("impl", [{"fused": True}, {"foreach": True}, {"foreach": False}])
def test_equals_adamw_bit_for_bit_until_the_freeze_then_keeps_v(impl: dict) -> None:
    a, b = _params(), _params()
    frozen = FrozenVarianceAdamW(a, freeze_after=5, **OPTS, **impl)
    adamw = torch.optim.AdamW(b, **OPTS, **impl)
    for t in range(5):
        _step(frozen, a, _grads(t))
        _step(adamw, b, _grads(t))
        for pa, pb in zip(a, b):
            assert torch.equal(pa, pb), t
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(frozen.state[pa][key], adamw.state[pb][key]), (t, key)
    v5 = [frozen.state[p]["exp_avg_sq"].clone() for p in a]
    for t in range(5, 8):
        _step(frozen, a, _grads(t))
        _step(adamw, b, _grads(t))
    for p, pb, v in zip(a, b, v5):
        assert torch.equal(frozen.state[p]["exp_avg_sq"], v)  # frozen at step 5's value
        assert not torch.equal(adamw.state[pb]["exp_avg_sq"], v)
        assert int(frozen.state[p]["step"]) == 8
        assert not torch.equal(p, pb)


def test_frozen_step_is_adamw_formula_with_the_freeze_steps_denominator() -> None:
    params = _params()
    opt = FrozenVarianceAdamW(params, freeze_after=3, **OPTS, foreach=False)
    for t in range(3):
        _step(opt, params, _grads(t))
    lr, (b1, b2), eps, wd = OPTS["lr"], OPTS["betas"], OPTS["eps"], OPTS["weight_decay"]
    for t in range(3, 6):
        grads = _grads(t)
        expected = []
        for p, g in zip(params, grads):
            st = opt.state[p]
            m = st["exp_avg"] * b1 + (1 - b1) * g
            v = torch.maximum(st["exp_avg_sq"], VARIANCE_FLOOR * st["exp_avg_sq"].mean())
            denom = FROZEN_MARGIN * (v.sqrt() / math.sqrt(1 - b2 ** 3) + eps)
            expected.append(p.detach() * (1 - lr * wd) - lr / (1 - b1 ** (t + 1)) * m / denom)
        _step(opt, params, grads)
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.detach(), e, rtol=1e-6, atol=1e-7)


def _movement(opt_cls, spread: bool, **kw) -> torch.Tensor:
    """How far weights move over 100 steps of a gradient g: g/100 each step (spread) or all of it
    at the last step (what error feedback does to a coordinate top-k 1% picks once in ~100)."""
    params = [nn.Parameter(torch.zeros(s)) for s in SHAPES]  # near zero: rounding far below the moves
    opt = opt_cls(params, lr=1e-3, betas=(0.0, 0.95), eps=1e-8, weight_decay=0.0, foreach=False, **kw)
    for t in range(10):  # the warm-up: the second moment of gradients of the spread steps' scale
        _step(opt, params, _grads(t, 0.01))
    start = [p.detach().clone() for p in params]
    g = _grads(99)
    for t in range(100):
        _step(opt, params, [x / 100 if spread else (x if t == 99 else torch.zeros_like(x)) for x in g])
    return torch.cat([(p.detach() - s).flatten() for p, s in zip(params, start)])


def test_a_delayed_spike_moves_weights_as_far_only_with_the_variance_frozen() -> None:
    spread = _movement(FrozenVarianceAdamW, True, freeze_after=10)
    spike = _movement(FrozenVarianceAdamW, False, freeze_after=10)
    torch.testing.assert_close(spike, spread, rtol=1e-4, atol=1e-4 * float(spread.abs().max()))  # linear: the same total move
    ada_spread, ada_spike = _movement(torch.optim.AdamW, True), _movement(torch.optim.AdamW, False)
    assert ada_spike.norm() < 0.2 * ada_spread.norm()  # AdamW: the spike loses most of its mass


def test_parameters_before_their_freeze_take_adamws_step() -> None:
    """A parameter whose state is younger (gradual unfreezing) keeps AdamW's update until its own
    step count reaches the freeze; the older ones are frozen meanwhile."""
    old, young = _params(1), _params(2)
    opt = FrozenVarianceAdamW([*old, *young], freeze_after=3, **OPTS, foreach=False)
    ref = torch.optim.AdamW([p.detach().clone().requires_grad_() for p in young], **OPTS, foreach=False)
    ref_params = ref.param_groups[0]["params"]
    for t in range(3):  # only the old ones train
        _step(opt, old, _grads(t))
    v_old = [opt.state[p]["exp_avg_sq"].clone() for p in old]
    for t in range(3, 6):
        for p, g in zip([*old, *young], [*_grads(t), *_grads(t, 0.5)]):
            p.grad = g.clone()
        opt.step()
        _step(ref, ref_params, _grads(t, 0.5))
        for p, r in zip(young, ref_params):
            assert torch.equal(p, r), t
    for p, v in zip(old, v_old):
        assert torch.equal(opt.state[p]["exp_avg_sq"], v)


def test_resume_mid_freeze_continues_bit_for_bit() -> None:
    a = _params()
    opt = FrozenVarianceAdamW(a, freeze_after=3, **OPTS, fused=True)
    for t in range(5):
        _step(opt, a, _grads(t))
    b = [nn.Parameter(p.detach().clone()) for p in a]
    resumed = FrozenVarianceAdamW(b, freeze_after=3, **OPTS, fused=True)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))  # as a checkpoint holds it
    for t in range(5, 9):
        _step(opt, a, _grads(t))
        _step(resumed, b, _grads(t))
        for pa, pb in zip(a, b):
            assert torch.equal(pa, pb), t


def test_build_optimizer_freezes_only_when_asked() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    assert type(build_optimizer(model, OptimizerConfig())) is torch.optim.AdamW
    opt = build_optimizer(model, OptimizerConfig(), freeze_variance_after=30)
    assert isinstance(opt, FrozenVarianceAdamW) and opt.freeze_after == 30
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    with pytest.raises(ValueError, match="freeze_after 0"):
        FrozenVarianceAdamW(model.parameters(), freeze_after=0)


# -- the hook's warm-up -----------------------------------------------------------------------------

NUMELS = (300, 1024)


@pytest.fixture(scope="module")
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def _warmup_hook(group, steps: int = 2) -> CompressionHook:
    cfg = CommConfig(compression="topk", warmup_steps=steps, warmup_compression="int4", topk_fraction=0.01)
    return CompressionHook(build_compressor(cfg), group, names={}, warmup=build_compressor(cfg, "int4"),
                           warmup_steps=cfg.warmup_steps)


def _grad(t: int) -> torch.Tensor:
    return torch.randn(sum(NUMELS), generator=torch.Generator().manual_seed(t))


def test_hook_runs_the_warmup_compressor_first_and_counts_its_bytes(one_rank_group, monkeypatch) -> None:
    from lmforge.parallel.comm import ddp_hooks

    # the ring model at two ranks (sent as it weighs), while the collective runs on one
    monkeypatch.setattr(ddp_hooks, "allgather_bytes", lambda nbytes, world: nbytes)
    monkeypatch.setattr(ddp_hooks, "allreduce_bytes", lambda nbytes, world: nbytes)
    names = ["a", "b"]
    hook = _warmup_hook(one_rank_group, steps=2)
    int4, topk = BlockQuantCompressor(4, 256), TopKCompressor(0.01)
    for t in range(4):
        g = _grad(t)
        out = hook.reduce(g.clone(), names, NUMELS).wait()
        hook.step_done()
        nonzero = int((out != 0).sum())  # int4 rounds the smallest values to 0, top-k keeps k
        assert nonzero == sum(topk.ks(NUMELS)) if t >= 2 else nonzero > sum(NUMELS) // 2, t
        # top-k steps after a warm-up also all-reduce the local squared norm: 4 bytes
        want = int4.wire_bytes(NUMELS) if t < 2 else topk.wire_bytes(NUMELS) + 4
        assert hook.accounting.window()["comm_bytes"] == want, t
        norm = hook.dense_grad_norm()
        if t < 2:
            assert norm is None  # int4's decoded sum is the gradient: clipping measures it
        else:
            torch.testing.assert_close(norm, g.norm())  # one rank: its own gradient's norm
    assert hook.accounting.sent == 2 * int4.wire_bytes(NUMELS) + 2 * (topk.wire_bytes(NUMELS) + 4)


def test_plain_topk_clips_by_its_decoded_sum(one_rank_group) -> None:
    cfg = CommConfig(compression="topk")
    hook = CompressionHook(build_compressor(cfg), one_rank_group, names={})
    hook.reduce(_grad(0), ["a", "b"], NUMELS).wait()
    hook.step_done()
    assert hook.dense_grad_norm() is None


def test_topk_picks_by_the_divisors_given(one_rank_group) -> None:
    """|value| / divisor ranks the values; the values sent are the gradient's own."""
    names = ["a", "b"]
    hook = _warmup_hook(one_rank_group, steps=0)
    g = _grad(7)
    divisors = {0: torch.linspace(0.01, 10.0, NUMELS[0]), 1: torch.ones(NUMELS[1])}
    hook.names = {0: "a", 1: "b"}
    hook.set_selection_divisors(divisors)
    out = hook.reduce(g.clone(), names, NUMELS).wait()
    a, ga = out[:NUMELS[0]], g[:NUMELS[0]]
    k = TopKCompressor(0.01).ks(NUMELS)[0]
    expected = torch.topk(ga.abs() / divisors[0], k).indices
    assert set(a.nonzero().squeeze(1).tolist()) == set(expected.tolist())
    assert torch.equal(a[expected], ga[expected])
    b = out[NUMELS[0]:]
    assert set(b.nonzero().squeeze(1).tolist()) == set(torch.topk(g[NUMELS[0]:].abs(), 11).indices.tolist())


def test_hook_step_count_and_residuals_resume(one_rank_group) -> None:
    """Saved after one warm-up step of two: the resumed hook runs the second warm-up step, then
    top-k, with the same residuals: the same bits as the straight one."""
    names = ["a", "b"]
    a = _warmup_hook(one_rank_group)
    a.reduce(_grad(0), names, NUMELS).wait()
    a.step_done()
    saved = a.state_dict()
    assert saved["steps"] == 1
    b = _warmup_hook(one_rank_group)
    b.load_state_dict(saved)
    for t in range(1, 5):
        ra, rb = a.reduce(_grad(t), names, NUMELS).wait(), b.reduce(_grad(t), names, NUMELS).wait()
        a.step_done()
        b.step_done()
        assert torch.equal(ra, rb), t
    old = {k: v for k, v in saved.items() if k != "steps"}  # a checkpoint from before the count
    c = _warmup_hook(one_rank_group)
    c.load_state_dict(old)
    assert c.steps == 0


def test_clip_by_a_given_norm() -> None:
    from lmforge.parallel.clip import clip_grad_norm_

    p = nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 3.0)  # its own norm: 6
    total = clip_grad_norm_([p], 1.0, total_norm=torch.tensor(2.0))
    assert float(total) == 2.0
    torch.testing.assert_close(p.grad, torch.full((4,), 1.5), rtol=1e-5, atol=0)  # scaled by 1 / 2


# -- config ------------------------------------------------------------------------------------------

def _ddp_job(**comm) -> JobConfig:
    cfg = JobConfig()
    cfg.train.global_batch_size, cfg.train.micro_batch_size = 8, 4
    cfg.parallel.dp_replicate, cfg.parallel.dp_shard = 2, 1
    for k, v in comm.items():
        setattr(cfg.comm, k, v)
    return cfg


def test_config_accepts_warmups_and_frozen_variance_with_elementwise_compressors() -> None:
    for kind in ("bf16", "int8", "topk"):
        _ddp_job(compression=kind, warmup_steps=5, adam_variance="frozen").validate(2)
    cfg = _ddp_job(compression="topk", warmup_steps=12, adam_variance="frozen")
    assert cfg.comm.variance_freeze_step() == 12
    assert _ddp_job(compression="topk", warmup_steps=12).comm.variance_freeze_step() == 0


@pytest.mark.parametrize("comm,message", [
    ({"compression": "powersgd", "warmup_steps": 30},
     r"comm.warmup_steps = 30: needs an element-wise comm.compression .*not 'powersgd' \(PowerSGD: "
     r"comm.powersgd_start_step\)"),
    ({"compression": "none", "warmup_steps": 30}, r"comm.warmup_steps = 30: .*not 'none'"),
    ({"compression": "topk", "warmup_steps": -1}, r"comm.warmup_steps = -1: must be >= 0"),
    ({"compression": "topk", "adam_variance": "frozen"},
     r"comm.adam_variance = 'frozen': 'frozen' needs comm.warmup_steps >= 1"),
    ({"compression": "topk", "warmup_steps": 30, "quant_block": 33},
     r"comm.quant_block = 33: must be a multiple of 2 with int4 \(2 values per byte\)"),
    ({"compression": "topk", "warmup_steps": 30, "warmup_compression": "int2", "quant_block": 34},
     r"comm.quant_block = 34: must be a multiple of 4 with int2 \(4 values per byte\)"),
])
def test_config_refuses_warmups_where_they_cannot_run(comm: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _ddp_job(**comm).validate(2)


def test_config_refuses_a_warmup_under_fsdp() -> None:
    cfg = _ddp_job(compression="bf16", warmup_steps=10)
    cfg.parallel.dp_replicate, cfg.parallel.dp_shard = 1, 2
    with pytest.raises(ConfigError, match=r"comm.warmup_steps = 10: needs DDP .*dp_shard = 2 > 1 is FSDP2"):
        cfg.validate(2)


def test_hand_over_waits_for_every_parameter_to_freeze() -> None:
    from lmforge.train.frozen_adamw import hand_over_frozen_variance

    class Hook:
        divisors: dict = {}

        def set_selection_divisors(self, divisors: dict) -> None:
            self.divisors = divisors

    params, hook = _params(), Hook()
    opt = FrozenVarianceAdamW(params, freeze_after=2, **OPTS)
    assert hand_over_frozen_variance(torch.optim.AdamW(_params(), **OPTS), hook)  # nothing to hand over
    assert hand_over_frozen_variance(opt, None)
    for t in range(2):
        assert not hand_over_frozen_variance(opt, hook) and not hook.divisors
        _step(opt, params, _grads(t))
    assert hand_over_frozen_variance(opt, hook)
    assert set(hook.divisors) == {id(p) for p in params}
    for p in params:
        assert hook.divisors[id(p)] is opt.frozen_denominator(p)
        assert float(hook.divisors[id(p)].min()) > 0
