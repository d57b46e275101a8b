"""FSDP2 (fully_shard): ZeRO-3 by default, ZeRO-2-like when parameters are not resharded after
forward, HSDP on a 2-D (replicate, shard) mesh. Each block is its own unit, then the root, so
all-gathers overlap block by block."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from lmforge.config import ParallelConfig


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, cfg: ParallelConfig, device: torch.device,
               pipeline: bool = False) -> None:
    """Shard in place. `default` reshards after forward except for the last block (its
    parameters are needed again at once in backward), and never under pipelining, where
    microbatches would re-gather the same parameters over and over."""
    param_dtype = torch.bfloat16 if cfg.fsdp_param_dtype == "bf16" else torch.float32
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    kwargs: dict = {"mesh": mesh, "mp_policy": mp}
    if cfg.cpu_offload:
        # pin_memory fails without CUDA; on CPU training the offload is a no-op anyway.
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
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
