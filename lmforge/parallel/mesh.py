"""Process group and DeviceMesh setup. A mesh exists even at world size 1, so code paths are the same
from a laptop to a cluster; meshes are returned and passed explicitly, never stored globally."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from lmforge.config import ParallelConfig
from lmforge.config.parallel import world_size_from_env
from lmforge.parallel.gloo import mesh_backend_override


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str


def pick_device(kind: str, local_rank: int) -> torch.device:
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device = 'cuda' but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def choose_backend(backend: str, device_type: str, cpu_offload: bool) -> str:
    """The process group backend: `parallel.backend`, or for "auto" nccl on CUDA and gloo on CPU.
    With `cpu_offload` on CUDA, FSDP2 runs collectives on host tensors too (e.g. the grad norm of
    offloaded gradients), so the group needs a CPU backend beside nccl: "cpu:gloo,cuda:nccl"."""
    base = backend if backend != "auto" else ("nccl" if device_type == "cuda" else "gloo")
    if cpu_offload and device_type == "cuda" and base == "nccl":  # GPU-only path
        return "cpu:gloo,cuda:nccl"
    return base


def init_distributed(cfg: ParallelConfig, device_kind: str) -> DistInfo:
    """Start the default process group (torchrun env, or an in-process store at world size 1)."""
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world = world_size_from_env()
    device = pick_device(device_kind, local_rank)
    backend = choose_backend(cfg.backend, device.type, cfg.cpu_offload)
    if not dist.is_initialized():
        if world == 1 and "MASTER_ADDR" not in os.environ:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            dist.init_process_group(backend, rank=rank, world_size=world)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=device, backend=backend)


@dataclass(frozen=True)
class ParallelDegrees:
    """The size of each parallel dimension after `dp_shard = -1` is resolved (1 when unused).
    `ep` borrows its ranks from `dp_shard` and is not a factor of the world size."""

    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    ep: int = 1

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int) -> ParallelDegrees:
        r = cfg.resolved(world_size)
        return cls(pp=r.pp, dp_replicate=r.dp_replicate, dp_shard=r.dp_shard, tp=r.tp, ep=r.ep)

    def as_dict(self) -> dict[str, int]:
        """Name -> degree in mesh order (pp, dp_replicate, dp_shard, tp, ep), e.g. for reports."""
        return asdict(self)

    def describe(self) -> str:
        """The dimensions in use, e.g. "dp_shard=2 x tp=2" ("single process" when none)."""
        return " x ".join(f"{k}={v}" for k, v in self.as_dict().items() if v > 1) or "single process"


MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")
# With expert parallel dp_shard is built as two dimensions (dp_shard_mod_ep, ep) and flattened back
# into "dp_shard", so everything that uses "dp_shard" or "dp" is unchanged.
EP_MESH_DIMS = ("pp", "dp_replicate", "dp_shard_mod_ep", "ep", "tp")


@dataclass
class ParallelMesh:
    """The world mesh (pp, dp_replicate, dp_shard, tp), size-1 dimensions included, plus the
    flattened data-parallel mesh "dp" that the loader and loss averaging use. With ep > 1 the
    world is (pp, dp_replicate, dp_shard_mod_ep, ep, tp) with "dp_shard" flattened back.

    Flattened meshes are kept as `_flatten` returns them (`flat`), never sliced back out of the
    world mesh by name: torch deprecates that (a UserWarning on every run since torch 2.11)."""

    world: DeviceMesh
    degrees: ParallelDegrees
    flat: dict[str, DeviceMesh] = field(default_factory=dict)

    def __getitem__(self, name: str) -> DeviceMesh:
        return self.flat[name] if name in self.flat else self.world[name]

    @property
    def dp(self) -> DeviceMesh:
        return self.flat["dp"]

    @property
    def ep(self) -> DeviceMesh | None:
        """The 1-D expert-parallel mesh (ranks that split one set of experts), None when ep = 1."""
        return self.world["ep"] if self.degrees.ep > 1 else None

    @property
    def expert_fsdp(self) -> DeviceMesh:
        """Mesh FSDP2 shards ep-split experts over: the dp ranks holding the same experts
        (dp_shard / ep, with dp_replicate for HSDP)."""
        if self.degrees.dp_replicate > 1:
            return self.world["dp_replicate", "dp_shard_mod_ep"]
        return self.world["dp_shard_mod_ep"]

    @property
    def fsdp(self) -> DeviceMesh:
        """Mesh FSDP2 shards over: 2-D (replicate, shard) for HSDP, else the shard dimension."""
        if self.degrees.dp_replicate > 1:
            if "dp_shard" in self.flat:  # ep > 1: dp_shard is itself a flattened mesh
                return DeviceMesh._concatenate([self.world["dp_replicate"], self.flat["dp_shard"]])
            return self.world["dp_replicate", "dp_shard"]
        return self["dp_shard"]


def build_mesh(info: DistInfo, cfg: ParallelConfig) -> ParallelMesh:
    degrees = ParallelDegrees.from_config(cfg, info.world_size)
    # ep borrows from dp_shard: dp_shard rank = dp_shard_mod_ep rank * ep + ep rank, so the ep
    # groups are neighbouring ranks (the all-to-alls stay inside a node when ep <= GPUs per node).
    sizes = {**degrees.as_dict(), "dp_shard_mod_ep": degrees.dp_shard // degrees.ep}
    dims = MESH_DIMS if degrees.ep == 1 else EP_MESH_DIMS
    world = init_device_mesh(info.device.type, tuple(sizes[d] for d in dims), mesh_dim_names=dims,
                             backend_override=mesh_backend_override(info.device.type, dims))
    if degrees.ep == 1:
        return ParallelMesh(world=world, degrees=degrees, flat={"dp": world["dp_replicate", "dp_shard"]._flatten("dp")})
    flat = {"dp_shard": world["dp_shard_mod_ep", "ep"]._flatten("dp_shard"),
            "dp": world["dp_replicate", "dp_shard_mod_ep", "ep"]._flatten("dp")}
    return ParallelMesh(world=world, degrees=degrees, flat=flat)


def shutdown_distributed(barrier: bool = True) -> None:
    """End the default group; skip the barrier when leaving on an error (peers may be gone)."""
    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
