"""Gradient-norm clipping for parameters spread over any mix of meshes.

torch.nn.utils.clip_grad_norm_ works for plain tensors or for DTensors that all live on one mesh
with one layout. Under FSDP2 x TP the parameters of one model do not: TP-sharded weights live on
the 2-D (dp_shard, tp) mesh, norm weights without sequence parallelism on the dp mesh only (and
are plain, replicated copies across TP ranks), and a pipeline stage holds only its own layers.
Here each group of same-mesh, same-layout DTensors gets its full (global) norm, plain tensors are
taken as they are (already identical on the ranks that share them), the squares are summed, and
optionally summed over the pipeline group; then every gradient is scaled in place by
min(1, max_norm / (total + 1e-6)), the factor torch uses (not at all when max_norm is inf).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from lmforge.tensors.dtensor import gathered


def _groups(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Plain tensors first, then one list per (mesh, placements), in first-seen order (the same
    on every rank of a mesh, so the per-group collectives line up)."""
    plain: list[torch.Tensor] = []
    by_layout: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        if isinstance(p, DTensor):
            by_layout.setdefault((p.device_mesh, tuple(p.placements)), []).append(p)
        else:
            plain.append(p)
    return ([plain] if plain else []) + list(by_layout.values())


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor] | torch.Tensor, max_norm: float,
                    foreach: bool | None = None, pp_group: dist.ProcessGroup | None = None,
                    total_norm: torch.Tensor | None = None) -> torch.Tensor:
    """Clip the global L2 norm of the gradients to `max_norm`, in place; returns the total norm
    (a plain 0-dim tensor, the same on every rank) measured before clipping.

    Handles plain tensors and DTensors on different meshes/placements in one call. With
    `pp_group`, the squared norms of all pipeline stages are summed (pass the pipeline group;
    every rank of it must call). For plain tensors alone and no `pp_group` the result is
    bit-identical to torch.nn.utils.clip_grad_norm_. `max_norm = inf` (clipping off) measures
    the norm and leaves the gradients untouched: no pass multiplying every gradient by 1.
    `total_norm`: the norm to clip by, measured elsewhere (a sparse compressor's estimate of the
    dense gradient's norm: lmforge/parallel/comm/ddp_hooks.py); then none is computed here.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    params = [p for p in parameters if p.grad is not None]
    groups = _groups(params)
    norms: list[torch.Tensor] = []
    for group in groups if total_norm is None else []:
        norm = get_total_norm([p.grad for p in group], 2.0, False, foreach)
        norms.append(gathered(norm))

    if total_norm is not None:
        total = total_norm
    elif len(norms) == 1 and pp_group is None:
        total = norms[0]  # exactly torch's value, no square/sqrt round trip
    else:
        device = norms[0].device if norms else torch.device("cpu")
        sq = torch.zeros((), dtype=torch.float32, device=device)
        for n in norms:
            sq = sq + n.to(device=device, dtype=torch.float32).square()
        if pp_group is not None:
            dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=pp_group)
        total = sq.sqrt()

    if math.isinf(max_norm):  # clipping off: the norm is still wanted (logging, stability), the scaling is not
        return total
    # Scale per group: torch's foreach kernels refuse a list that mixes DTensors and plain tensors.
    for group in groups:
        clip_grads_with_norm_(group, max_norm, total, foreach)
    return total
