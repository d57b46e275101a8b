"""AdamW with decoupled weight decay on matrices only (norm gains are not decayed); its second
moment frozen after a warm-up under `comm.adam_variance = "frozen"` (train/frozen_adamw.py); its
moments kept per rank, before the compression, under `comm.adam_moments = "local"`
(train/local_moments_adamw.py)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from lmforge.config import OptimizerConfig
from lmforge.parallel.comm.local_moments import LocalMomentsExchange
from lmforge.train.frozen_adamw import FrozenVarianceAdamW
from lmforge.train.local_moments_adamw import LocalMomentsAdamW

if TYPE_CHECKING:
    from lmforge.observability.breakdown import StepBreakdown
    from lmforge.train.continual import ParamUnit


def _implementation_flags(impl: str, params: list[torch.Tensor], groups: list[list[torch.Tensor]]) -> dict[str, bool]:
    if impl == "fused":
        return {"fused": True}
    if impl == "foreach":
        return {"foreach": True}
    if impl == "for-loop":
        return {"foreach": False}
    # auto: fused kernels exist for CPU and CUDA float tensors in recent PyTorch. They (and foreach)
    # refuse a param group that mixes DTensors and plain tensors (tensor parallel without FSDP with an MoE
    # layer replicated over tp): then the per-parameter loop. (Splitting the param groups instead
    # would break resuming the optimizer state under another layout.)
    if any(0 < sum(isinstance(p, DTensor) for p in g) < len(g) for g in groups):
        return {"foreach": False}
    devices = {p.device.type for p in params}
    if devices <= {"cpu", "cuda"}:
        return {"fused": True}
    return {"foreach": True}


def local_moments_of(comm: object, fp16: bool, breakdown: StepBreakdown) -> LocalMomentsExchange | None:
    """The exchange of each rank's AdamW updates when `comm` (the DDP hook's state) is one
    (comm.adam_moments = "local"), its all-gather timed by `breakdown` as exposed communication
    (it runs inside the optimizer step, not in backward); else None. fp16, which `auto` picks on a
    GPU without bf16, is refused here (the config refuses it when named): its loss scaler could
    skip a step on one rank only, and the replicas would part."""
    if not isinstance(comm, LocalMomentsExchange):
        return None
    if fp16:
        raise ValueError("comm.adam_moments = 'local' with fp16 (train.mixed_precision 'auto' chose it on this GPU): "
                         "its loss scaler could skip a step on one rank only; set train.mixed_precision bf16 or fp32")
    comm.timer = functools.partial(breakdown.phase, "comm_exposed")
    return comm


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, units: list[ParamUnit] | None = None,
                    freeze_variance_after: int = 0,
                    local_moments: LocalMomentsExchange | None = None) -> torch.optim.Optimizer:
    """`units` (gradual unfreezing, lmforge/train/continual.py): parameters by the step they start
    training at and their lr scale; each unit gets its own decay / no-decay groups tagged
    `unfreeze_step` (parameters in no unit are not optimized). None: one unit, every parameter.
    `freeze_variance_after` > 0: AdamW's second moment frozen after that many steps of each
    parameter (FrozenVarianceAdamW; comm.adam_variance = "frozen"). `local_moments`: each rank's
    moments, its update sent through that exchange (LocalMomentsAdamW; comm.adam_moments = "local")."""
    if units is None:
        params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    else:
        groups = [{"params": [p for p in u.params if (p.ndim >= 2) == matrix], "lr": cfg.lr * u.lr_scale,
                   "weight_decay": cfg.weight_decay if matrix else 0.0, "unfreeze_step": u.step}
                  for u in units for matrix in (True, False)]
        groups = [g for g in groups if g["params"]]
        params = [p for g in groups for p in g["params"]]
    if local_moments is not None:
        return LocalMomentsAdamW(groups, local_moments, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    options = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps,
               **_implementation_flags(cfg.implementation, params, [g["params"] for g in groups])}
    if freeze_variance_after > 0:
        return FrozenVarianceAdamW(groups, freeze_after=freeze_variance_after, **options)
    return torch.optim.AdamW(groups, **options)
