"""Hierarchical (two-level) gradient all-reduce as a DDP comm hook (`comm.hierarchical`).

The data-parallel ranks are seen as a (nodes, node_size) DeviceMesh: consecutive ranks share a
node (torchrun numbers the ranks of one node consecutively). Each gradient bucket is
reduce-scattered inside the node (fast links), each rank all-reduces its 1/node_size shard with
the same-position ranks of the other nodes (the slow links then carry 1/node_size of the bucket
per rank instead of the whole ring's share), and the node all-gathers the reduced shards back.

Equal to DDP's flat all-reduce up to the order of the fp32 additions: the buckets are divided by
the world size first, as DDP's default hook does, so only the summation order differs (node
sums first, then across nodes); values that add exactly (e.g. small integers) come out
bit-equal, others within a few fp32 ulps (tests/multi_rank/test_hierarchical.py).
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations as objects
# (a string "dist.GradBucket" is refused).
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel as DDP

from lmforge.config.checks import require
from lmforge.config.comm import resolve_node_size

NODE_DIMS = ("node", "local")  # across nodes, inside a node


@dataclass
class HierarchicalState:
    """The two groups a rank reduces over, kept by the hook (DDP passes it back on every bucket)."""

    intra: dist.ProcessGroup  # the ranks of this rank's node
    inter: dist.ProcessGroup  # this rank's peers (same local rank) on the other nodes
    node_size: int
    world: int
    # the one thread that runs the hook's collectives, in bucket order (see hierarchical_allreduce)
    worker: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "lmforge-hierarchical"))

    @classmethod
    def from_mesh(cls, dp_mesh: DeviceMesh, node_size: int) -> "HierarchicalState":
        """Split the 1-D data-parallel mesh into (nodes, node_size); `node_size` as configured
        (0: LOCAL_WORLD_SIZE). Refused in one line when it does not divide the mesh."""
        world = dp_mesh.size()
        size = resolve_node_size(node_size) or world
        require(world % size == 0, "comm.node_size", size,
                f"must divide the data-parallel degree ({world}) for comm.hierarchical")
        mesh2d = dp_mesh._unflatten(0, (world // size, size), NODE_DIMS)
        return cls(intra=mesh2d["local"].get_group(), inter=mesh2d["node"].get_group(), node_size=size,
                   world=world)


def hierarchical_allreduce(tensor: torch.Tensor, state: HierarchicalState) -> torch.futures.Future[torch.Tensor]:
    """Sum `tensor` (1-D, contiguous) over all data-parallel ranks in place, on the state's worker
    thread; returns a future of `tensor` (the backward goes on meanwhile, as with DDP's own
    all-reduce). One thread issues every collective of the hook, bucket after bucket, so all ranks
    issue them in the same order: chaining the steps on the collectives' futures instead would
    let bucket k's all-gather and bucket k+1's reduce-scatter reach the node group in a different
    order on different ranks (measured: a hang at 4 ranks), and gloo's reduce-scatter has no
    future to chain on anyway ("Work::getFuture not implemented", torch 2.13)."""
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()

    def run() -> None:
        try:
            reduce_two_level(tensor, state)
            fut.set_result(tensor)
        except BaseException as e:  # handed to DDP, which raises it on the training thread
            fut.set_exception(e)

    state.worker.submit(run)
    return fut


def reduce_two_level(tensor: torch.Tensor, state: HierarchicalState) -> None:
    """The blocking two-level sum: reduce-scatter inside the node, all-reduce of this rank's shard
    across nodes, all-gather inside the node. Any length: the last shard is padded with zeros."""
    k, n = state.node_size, tensor.numel()
    if k == 1 or state.world == k:  # one level only: a plain all-reduce over the group that has it
        dist.all_reduce(tensor, group=state.inter if k == 1 else state.intra)
        return
    shard = -(-n // k)
    padded = tensor if shard * k == n else torch.cat([tensor, tensor.new_zeros(shard * k - n)])
    part = tensor.new_empty(shard)
    dist.reduce_scatter_single(part, padded, group=state.intra)
    dist.all_reduce(part, group=state.inter)
    dist.all_gather_single(padded, part, group=state.intra)
    if padded is not tensor:
        tensor.copy_(padded[:n])


def hierarchical_hook(state: HierarchicalState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: the average of the bucket over all ranks, reduced in two levels."""
    buffer = bucket.buffer()
    buffer.div_(state.world)  # as DDP's default allreduce hook: divide, then sum
    return hierarchical_allreduce(buffer, state)


def register_hierarchical_hook(model: DDP, dp_mesh: DeviceMesh, node_size: int) -> "HierarchicalState":
    """Make `model`'s gradient reduction hierarchical; returns the state (its groups) for tests."""
    state = HierarchicalState.from_mesh(dp_mesh, node_size)
    model.register_comm_hook(state, hierarchical_hook)
    return state
