"""FSDP2 (fully_shard): ZeRO-3 by default, ZeRO-2-like when parameters are not resharded after
forward, HSDP on a 2-D (replicate, shard) mesh. Each block is its own unit, then the root, so
all-gathers overlap block by block.

`FSDPPolicy` is built once from the config (mixed precision, CPU offload, when to reshard) and
used for the dense blocks here and for the ep-sharded experts (lmforge.parallel.ep), so both
always shard with the same options.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from lmforge.config import ParallelConfig
from lmforge.tensors.dtypes import DTYPES


@dataclass(frozen=True)
class FSDPPolicy:
    """fully_shard's options from `parallel.fsdp_param_dtype`, `parallel.cpu_offload` and
    `parallel.fsdp_reshard_after_forward` (the config refuses all three without FSDP)."""

    mp_policy: MixedPrecisionPolicy
    offload_policy: CPUOffloadPolicy | None
    reshard_after_forward: str  # "default" | "always" | "never"

    @classmethod
    def from_config(cls, cfg: ParallelConfig, device: torch.device,
                    reduce_dtype: torch.dtype = torch.float32) -> FSDPPolicy:
        """`reduce_dtype`: the gradients' reduce-scatter dtype (comm.compression bf16 / fp16; no error
        feedback there: FSDP casts inside its own collective)."""
        param_dtype = DTYPES[cfg.fsdp_param_dtype]
        # GPU-only in effect: on CUDA, FSDP2 keeps params, grads and optimizer state in pinned host
        # memory, copies each unit in for its compute, and its CPU-side collectives (e.g. the grad
        # norm of offloaded grads) need the process group's CPU backend (lmforge.parallel.mesh
        # starts "cpu:gloo,cuda:nccl" then). On CPU training the tensors already live in host
        # memory and pin_memory would fail without CUDA: the policy is a no-op there.
        offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cfg.cpu_offload else None
        return cls(mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
                   offload_policy=offload, reshard_after_forward=cfg.fsdp_reshard_after_forward)

    def kwargs(self, mesh: DeviceMesh) -> dict:
        """fully_shard's keyword arguments over `mesh` (all but reshard_after_forward)."""
        kwargs: dict = {"mesh": mesh, "mp_policy": self.mp_policy}
        if self.offload_policy is not None:
            kwargs["offload_policy"] = self.offload_policy
        return kwargs

    def reshard_block(self, index: int, n_blocks: int, pipeline: bool) -> bool:
        """`default` reshards after forward except for the last block (its parameters are needed
        again at once in backward), and never under pipelining, where microbatches would re-gather
        the same parameters over and over; `always` and `never` hold whatever the layout."""
        if self.reshard_after_forward == "always":
            return True
        if self.reshard_after_forward == "never" or pipeline:
            return False
        return index < n_blocks - 1

    def reshard_root(self) -> bool:
        return self.reshard_after_forward == "always"

    def reshard_experts(self, pipeline: bool) -> bool:
        """The experts are most of an MoE model's weights: freed after forward like the blocks
        (`default`: not under pipelining; `always` / `never` hold)."""
        return self.reshard_after_forward == "always" or (self.reshard_after_forward == "default" and not pipeline)


def fsdp_kwargs(mesh: DeviceMesh, cfg: ParallelConfig, device: torch.device) -> dict:
    """fully_shard's arguments from the config (`FSDPPolicy.from_config(cfg, device).kwargs(mesh)`)."""
    return FSDPPolicy.from_config(cfg, device).kwargs(mesh)


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, policy: FSDPPolicy, pipeline: bool = False) -> None:
    """Shard in place: each block of `model.layers` (see `FSDPPolicy.reshard_block`), then the root."""
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        fully_shard(block, reshard_after_forward=policy.reshard_block(i, len(blocks), pipeline), **policy.kwargs(mesh))
    fully_shard(model, reshard_after_forward=policy.reshard_root(), **policy.kwargs(mesh))
