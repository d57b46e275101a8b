"""Router balancing: what the trainer does for Mixture-of-Experts layers (the model itself stays
process-group free). Add the router losses to the training loss, update the aux-loss-free
balancing biases after each optimizer step from the load summed over data-parallel ranks, and
collect per-layer load metrics at log steps.

The layers report what they measure to a `RouterStats` collector (lmforge.models.common.router_stats);
`RouterBalance` hands the model's layers one and reads only that. The functions take the
(block index, MoE) pairs and the collector (by default each layer's own, for single layers).
Works through any wrapper (DDP, FSDP2, activation checkpointing, pipeline parts): MoE modules
are found with `model.named_modules()` and named by their block index.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from lmforge.models.common.moe import MoE, load_stats
from lmforge.models.common.router_stats import RouterStats

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def moe_layers(model: nn.Module) -> list[tuple[int, MoE]]:
    """(block index, MoE module) for every MoE feed-forward in `model`, in block order."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, MoE):
            m = _LAYER.search(name)
            out.append((int(m.group(1)) if m else len(out), mod))
    return sorted(out, key=lambda t: t[0])


def _stats(layer: MoE, stats: RouterStats | None) -> RouterStats:
    """The collector `layer` reports to: `stats` when given (the trainer's), else its own."""
    return stats if stats is not None else layer.router_stats


def router_loss(layers: list[tuple[int, MoE]], stats: RouterStats | None = None) -> torch.Tensor | None:
    """Sum over layers of aux_loss_coef * aux + z_loss_coef * z of the last forward (with grad);
    None when no layer has a nonzero coefficient (nothing to add)."""
    terms = []
    for _, m in layers:
        aux = _stats(m, stats).aux_loss.get(m.layer_id)
        if aux is not None and (m.cfg.aux_loss_coef > 0 or m.cfg.z_loss_coef > 0):
            terms.append(aux)
    return torch.stack(terms).sum() if terms else None


class _RouterLossGrad(torch.autograd.Function):
    """Identity on a MoE layer's output; its backward also hands the layer's router loss the
    gradient `scale`, exactly as if `scale * router_loss` had been added to the loss. Pipeline
    stages other than the last never see the loss function, so this is how their router losses
    train (the idea of Megatron-LM's MoEAuxLossAutoScaler)."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.aux_shape, ctx.aux_dtype, ctx.aux_device = aux.shape, aux.dtype, aux.device
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        return grad, torch.full(ctx.aux_shape, ctx.scale, dtype=ctx.aux_dtype, device=ctx.aux_device), None


def attach_router_losses(layers: list[tuple[int, MoE]], scale: Callable[[], float],
                         stats: RouterStats | None = None) -> list:
    """For pipelining: make each MoE layer's backward train its router loss with weight `scale()`
    (the factor the pipeline applies to each micro-batch's loss: 1 / (microbatches * accumulation),
    times the fp16 loss scale). Returns the hook handles."""
    def hook(mod: MoE, _inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        aux = _stats(mod, stats).aux_loss.get(mod.layer_id)
        if not mod.training or aux is None or not torch.is_grad_enabled() or out.device.type == "meta":
            return out
        return _RouterLossGrad.apply(out, aux, scale())
    return [m.register_forward_hook(hook) for _, m in layers
            if m.cfg.aux_loss_coef > 0 or m.cfg.z_loss_coef > 0]


def _sum_over(t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def reset_expert_load(layers: list[tuple[int, MoE]], stats: RouterStats | None = None) -> None:
    """Forget counted loads (call before a step's first forward: evaluation that runs whole
    training steps, pipeline eval for V schedules, must not count)."""
    for _, m in layers:
        _stats(m, stats).load.pop(m.layer_id, None)


@torch.no_grad()
def update_expert_biases(layers: list[tuple[int, MoE]], group: dist.ProcessGroup | None = None,
                         apply: bool = True, stats: RouterStats | None = None) -> None:
    """After an optimizer step: sum each layer's tokens per expert since the last update over the
    data-parallel `group` (one all-reduce for all layers, so every replica applies the same
    update and the biases stay identical), move the biases, reset the counters.

    `apply=False` only resets (same value on every rank): the trainer passes it for a step the
    stability policy skipped. A layer counts the load of the forwards whose backward ran (see
    lmforge.models.common.router_stats), so the extra forwards of torch pipelining's shape inference
    and of activation checkpointing never count: every layout moves the biases as one process."""
    layers = [(i, m) for i, m in layers if m.cfg.bias_update_rate > 0 and m.router.expert_bias is not None]
    if not apply:
        reset_expert_load(layers, stats)
    if not layers or not apply:
        return
    counted = [_stats(m, stats).load.get(m.layer_id) for _, m in layers]
    loads = _sum_over(torch.stack([load if load is not None else torch.zeros_like(m.router.expert_bias)
                                   for (_, m), load in zip(layers, counted)]), group)
    for (_, m), load in zip(layers, loads):
        m.router.update_bias(load, m.cfg.bias_update_rate)
    reset_expert_load(layers, stats)


@torch.no_grad()
def moe_metrics(layers: list[tuple[int, MoE]], group: dist.ProcessGroup | None = None,
                per_expert_max: int = 16, stats: RouterStats | None = None) -> dict[str, float]:
    """Per-layer figures of the last training forward, tokens summed over `group` (one
    all-reduce; call it on every rank of the group): load CV, max/mean, dropped assignments, aux
    and z loss (means over ranks), and tokens per expert when a layer has <= `per_expert_max`
    experts. Plus `moe_*` means over layers. Empty when no layer has run yet."""
    last = [(i, _stats(m, stats).last.get(m.layer_id)) for i, m in layers]
    last = [(i, figures) for i, figures in last if figures]
    if not last:
        return {}
    tokens = torch.stack([figures["tokens_per_expert"].float() for _, figures in last])
    scalars = torch.stack([torch.stack([figures[k].float() for k in ("dropped", "aux_loss", "z_loss")])
                           for _, figures in last])
    n = dist.get_world_size(group) if group is not None and dist.is_initialized() else 1
    packed = _sum_over(torch.cat([tokens, scalars], dim=1), group)
    tokens, scalars = packed[:, :tokens.shape[1]], packed[:, tokens.shape[1]:]
    out: dict[str, float] = {}
    summary: dict[str, list[float]] = {}
    for row, ((i, _), load) in enumerate(zip(last, tokens)):
        figures = load_stats(load)
        figures |= {"dropped": float(scalars[row, 0]), "aux_loss": float(scalars[row, 1]) / n,
                    "z_loss": float(scalars[row, 2]) / n}
        for k, v in figures.items():
            out[f"moe{i}_{k}"] = v
            summary.setdefault(k, []).append(v)
        if load.numel() <= per_expert_max:
            out |= {f"moe{i}_tokens_e{j}": float(c) for j, c in enumerate(load)}
    out |= {f"moe_{k}": sum(v) / len(v) for k, v in summary.items()}
    return out


class RouterBalance:
    """The MoE layers of one model as the trainer drives them: they report to one collector
    (`stats`), which is all this reads; bias updates and metrics sum over the data-parallel `group`."""

    def __init__(self, layers: list[tuple[int, MoE]], group: dist.ProcessGroup | None):
        self.layers, self.group = layers, group
        self.stats = RouterStats()
        for _, m in layers:
            m.report_to(self.stats)

    @classmethod
    def for_model(cls, model: nn.Module, group: dist.ProcessGroup | None) -> RouterBalance | None:
        """One for `model`'s MoE layers; None for a dense model (nothing to do)."""
        layers = moe_layers(model)
        return cls(layers, group) if layers else None

    def start_step(self) -> None:
        reset_expert_load(self.layers, self.stats)

    def loss(self) -> torch.Tensor | None:
        """The router losses of the last forward, to add to the training loss (None: nothing to add)."""
        return router_loss(self.layers, self.stats)

    def train_through_pipeline(self, scale: Callable[[], float]) -> None:
        """Router losses of every pipeline stage join through the backward (`attach_router_losses`)."""
        attach_router_losses(self.layers, scale, self.stats)

    def end_step(self, apply: bool) -> None:
        """After the optimizer step: move the biases (`apply=False` on a skipped step: only reset)."""
        update_expert_biases(self.layers, self.group, apply=apply, stats=self.stats)

    def metrics(self) -> dict[str, float]:
        return moe_metrics(self.layers, self.group, stats=self.stats)
