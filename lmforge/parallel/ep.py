"""Expert parallelism (GShard, Lepikhin et al., 2020), applied from outside the plain MoE layer.

Each MoE layer's routed experts (`GroupedExperts`: w1/w3 (E, hidden, dim), w2 (E, dim, hidden))
are split along dim 0 over the 1-D `ep` mesh: DTensor Shard(0), so a checkpoint still sees the
full-expert names and shapes and DCP reshards between layouts (ep=2 -> one process and back).
Routing stays data-parallel: every rank routes its own tokens. Around the expert compute two
hooks (`torch.distributed.tensor.distribute_module` input/output functions) move the tokens:

    dispatch: the (A, dim) assignments, grouped by global expert, go to the rank that owns their
              expert. Counts per expert are exchanged first (all_to_all_single on E ints), then
              the tokens with uneven splits (`all_to_all_single_autograd`: its backward is the
              reverse all-to-all). Received rows come grouped by (source rank, local expert);
              they are permuted to (local expert, source rank) for the grouped matmuls.
    combine:  the inverse permutation, then the reverse all-to-all back to the source ranks;
              `moe.combine` then scatter-adds with the router weights as in one process.

Gradient scale: a rank's expert gradients sum the contributions of the tokens of all `ep` ranks
of its group (each from its own rank's mean loss), so the combine scales the gradient that enters
the experts by 1/ep and the dispatch scales the tokens' gradient back by ep (exact for powers of
two): the expert weights get the mean over their ep group, the tokens their own gradient. FSDP2
over the remaining dp_shard/ep (x dp_replicate) ranks then averages as it does for dense weights:
mean over all data-parallel ranks. (FSDP2's `set_gradient_divide_factor` would do the same in one
place, but needs PREMUL_SUM, which gloo lacks, and its sum-only fallback lost the factor under
gradient accumulation on a 1-rank mesh in torch 2.13.)
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard, distribute_module, distribute_tensor

from lmforge.models.common.moe import MoE
from lmforge.parallel.fsdp import FSDPPolicy


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `factor` in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


class _Dispatcher:
    """The state one MoE layer's expert call needs between dispatch and combine (the splits
    and the permutation of received rows). Rebuilt by every forward, also the recomputed one
    under activation checkpointing: every rank recomputes in the same order."""

    def __init__(self, n_experts: int, mesh: DeviceMesh):
        self.mesh, self.ranks = mesh, mesh.size()
        self.local_experts = n_experts // self.ranks
        self.group = mesh.get_group()
        self.input_splits: list[int] = []
        self.output_splits: list[int] = []
        self.order: torch.Tensor | None = None

    def dispatch(self, module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple[torch.Tensor, torch.Tensor]:
        xs, counts = inputs
        if xs.device.type == "meta":  # shape inference (pipeline stages): no tokens to move
            return xs, counts
        p, n = self.ranks, self.local_experts
        # recv[s, l]: assignments rank s sends to my local expert l. int64 all-to-all is fine on gloo/nccl.
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts.contiguous(), group=self.group)
        # Both split lists in one device-to-host copy.
        self.input_splits, self.output_splits = torch.stack([counts.view(p, -1).sum(1),
                                                             recv.view(p, -1).sum(1)]).tolist()
        got = all_to_all_single_autograd(xs.contiguous(), self.output_splits, self.input_splits, self.group)
        # Rows arrive as blocks (source s, local expert l); the experts want (l, s).
        blocks = recv.view(p, n)
        starts = (torch.cumsum(blocks.reshape(-1), 0) - blocks.reshape(-1)).view(p, n)
        by_expert_sizes, by_expert_starts = blocks.t().reshape(-1), starts.t().reshape(-1)
        total = sum(self.output_splits)  # already on the host
        block = torch.repeat_interleave(torch.arange(p * n, device=xs.device), by_expert_sizes, output_size=total)
        offset = torch.arange(total, device=xs.device) - (torch.cumsum(by_expert_sizes, 0) - by_expert_sizes)[block]
        self.order = by_expert_starts[block] + offset
        # Expert weights see the tokens of all `p` ranks: their gradient is scaled by 1/p (see combine),
        # the tokens' own gradient is scaled back by p here, so it leaves the experts unchanged.
        return _ScaleGrad.apply(got[self.order], float(p)), blocks.sum(0)

    def combine(self, module: nn.Module, ys: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
        if ys.device.type == "meta":
            return ys
        ys = _ScaleGrad.apply(ys, 1.0 / self.ranks)
        back = torch.empty_like(ys).index_copy(0, self.order, ys) if ys.shape[0] else ys
        out = all_to_all_single_autograd(back, self.input_splits, self.output_splits, self.group)
        self.order = None
        return out


def _shard_experts(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
    for pname, param in list(module.named_parameters(recurse=False)):
        dparam = nn.Parameter(distribute_tensor(param.data, mesh, [Shard(0)]), requires_grad=param.requires_grad)
        module.register_parameter(pname, dparam)


def apply_ep(model: nn.Module, ep_mesh: DeviceMesh) -> int:
    """Shard every MoE layer's experts of `model` over the 1-D `ep_mesh` and install the
    all-to-all dispatch/combine around their compute, in place. Call after TP and before
    activation checkpointing, compile and FSDP2. On a CPU mesh pass an initialised model (the
    shards are cut from it; DTensor has no CPU RNG tracker for a sharded init). Returns the
    number of MoE layers handled."""
    if ep_mesh.ndim != 1:
        raise ValueError(f"apply_ep: ep_mesh must be 1-D, got a {ep_mesh.ndim}-D mesh")
    n = 0
    for mod in model.modules():
        if not isinstance(mod, MoE):
            continue
        experts = mod.experts
        if experts.n_experts % ep_mesh.size():
            raise ValueError(f"apply_ep: {experts.n_experts} experts do not split over ep = {ep_mesh.size()}")
        d = _Dispatcher(experts.n_experts, ep_mesh)
        distribute_module(experts, ep_mesh, partition_fn=_shard_experts, input_fn=partial(_Dispatcher.dispatch, d),
                          output_fn=partial(_Dispatcher.combine, d))
        n += 1
    return n


def apply_expert_fsdp(model: nn.Module, mesh: DeviceMesh, policy: FSDPPolicy, pipeline: bool = False) -> None:
    """fully_shard each MoE layer's (ep-sharded) experts over `mesh`, the data-parallel ranks
    that hold the same experts (dp_shard / ep, times dp_replicate for HSDP), before the blocks are
    sharded over all of dp_shard (those then leave the experts alone). FSDP2 averages over `mesh`;
    the 1/ep for the ep group is applied by the dispatch (see the module docstring).

    `policy` is the one the blocks are sharded with, even where `mesh` has one rank
    (dp_shard == ep): `fsdp_param_dtype` casts the experts for compute, `cpu_offload` keeps them in
    host memory, `fsdp_reshard_after_forward` frees them after forward. (ep > 1 implies dp_shard > 1,
    so the config never refuses these options with ep.)"""
    reshard = policy.reshard_experts(pipeline)
    for mod in model.modules():
        if isinstance(mod, MoE):
            fully_shard(mod.experts, reshard_after_forward=reshard, **policy.kwargs(mesh))
