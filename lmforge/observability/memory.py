"""Per-rank tensor accounting: bytes of parameters, gradients and optimizer state this rank holds
(the local shards of DTensors), and the activations one micro-batch saves for backward. Works the
same on CPU and GPU, so the effect of each parallel dimension is visible without CUDA."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lmforge.tensors.dtensor import local_shard


def _storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of distinct storages (tied weights and views count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        local = local_shard(t)
        if local.device.type == "meta" or local.numel() == 0:
            continue
        storage = local.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def model_state_bytes(modules: Iterable[nn.Module], optimizer: torch.optim.Optimizer | None) -> dict[str, int]:
    """{"params", "grads", "optimizer"} bytes held by this rank."""
    params = [p for m in modules for p in m.parameters()]
    grads = [p.grad for p in params if p.grad is not None]
    optim: list[torch.Tensor] = []
    if optimizer is not None:
        for state in optimizer.state.values():
            optim.extend(v for v in state.values() if isinstance(v, torch.Tensor))
    return {"params": _storage_bytes(params), "grads": _storage_bytes(grads), "optimizer": _storage_bytes(optim)}


class ActivationMeter:
    """Sums the bytes autograd saves for backward (excluding parameters) while active."""

    def __init__(self, modules: Iterable[nn.Module]):
        self._param_ptrs = {local_shard(p).untyped_storage().data_ptr() for m in modules for p in m.parameters()
                            if local_shard(p).device.type != "meta"}
        self._storages: dict[int, int] = {}

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        local = local_shard(t)
        if local.device.type != "meta" and local.numel():
            try:
                storage = local.untyped_storage()
                ptr = storage.data_ptr()
            except RuntimeError:
                # FSDP2's unsharded parameters may have freed their storage by now: a parameter,
                # not an activation, so there is nothing to count.
                return t
            if ptr not in self._param_ptrs:
                self._storages[ptr] = storage.nbytes()
        return t

    @contextmanager
    def measure(self) -> Iterator[ActivationMeter]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self
