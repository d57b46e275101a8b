"""Process group and DeviceMesh setup. A mesh exists even at world size 1, so code paths are the same
from a laptop to a cluster; meshes are returned and passed explicitly, never stored globally."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from lmforge.config import ParallelConfig


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str


def world_size_from_env() -> int:
    """World size as torchrun announces it (1 when launched as a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def pick_device(kind: str, local_rank: int) -> torch.device:
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device = 'cuda' but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(cfg: ParallelConfig, device_kind: str) -> DistInfo:
    """Start the default process group (torchrun env, or an in-process store at world size 1)."""
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world = world_size_from_env()
    device = pick_device(device_kind, local_rank)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        if world == 1 and "MASTER_ADDR" not in os.environ:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            dist.init_process_group(backend, rank=rank, world_size=world)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=device, backend=backend)


def build_mesh(info: DistInfo) -> DeviceMesh:
    """1-D data-parallel mesh named "dp" (the N-D layout extends this)."""
    return init_device_mesh(info.device.type, (info.world_size,), mesh_dim_names=("dp",))


def shutdown_distributed(barrier: bool = True) -> None:
    """End the default group; skip the barrier when leaving on an error (peers may be gone)."""
    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
