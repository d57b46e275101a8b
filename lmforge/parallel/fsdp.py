"""FSDP2 (fully_shard): ZeRO-3 by default, ZeRO-2-like when parameters are not resharded after
forward, HSDP on a 2-D (replicate, shard) mesh. Each block is its own unit, then the root, so
all-gathers overlap block by block."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from lmforge.config import ParallelConfig


def fsdp_kwargs(mesh: DeviceMesh, cfg: ParallelConfig, device: torch.device) -> dict:
    """fully_shard's arguments from `parallel.fsdp_param_dtype` and `parallel.cpu_offload`, the
    same for the blocks and (with ep > 1) the experts. The config refuses both without FSDP."""
    param_dtype = torch.bfloat16 if cfg.fsdp_param_dtype == "bf16" else torch.float32
    kwargs: dict = {"mesh": mesh, "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)}
    if cfg.cpu_offload:
        # GPU-only in effect: on CUDA, FSDP2 keeps params, grads and optimizer state in pinned host
        # memory, copies each unit in for its compute, and its CPU-side collectives (e.g. the grad
        # norm of offloaded grads) need the process group's CPU backend (lmforge.parallel.mesh
        # starts "cpu:gloo,cuda:nccl" then). On CPU training the tensors already live in host
        # memory and pin_memory would fail without CUDA: the policy is a no-op there.
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    return kwargs


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, cfg: ParallelConfig, device: torch.device,
               pipeline: bool = False) -> None:
    """Shard in place. `default` reshards after forward except for the last block (its
    parameters are needed again at once in backward), and never under pipelining, where
    microbatches would re-gather the same parameters over and over; `always` and `never` hold
    whatever the layout."""
    kwargs = fsdp_kwargs(mesh, cfg, device)
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        if cfg.fsdp_reshard_after_forward == "always":
            reshard = True
        elif cfg.fsdp_reshard_after_forward == "never" or pipeline:
            reshard = False
        else:
            reshard = i < len(blocks) - 1
        fully_shard(block, reshard_after_forward=reshard, **kwargs)
    fully_shard(model, reshard_after_forward=cfg.fsdp_reshard_after_forward == "always", **kwargs)
