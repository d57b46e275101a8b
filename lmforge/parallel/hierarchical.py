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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel as DDP

from lmforge.config.checks import require
from lmforge.config.comm import resolve_node_size

NODE_DIMS = ("node", "local")  # across nodes, inside a node


def _stage(name: str) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(1, f"lmforge-hierarchical-{name}")


@dataclass
class HierarchicalState:
    """The groups a rank reduces over and the threads that issue the collectives, kept by the hook
    (DDP passes it back on every bucket). The node's ranks have two groups, one for the
    reduce-scatters and one for the all-gathers, so each group is used by one thread only."""

    intra: dist.ProcessGroup  # the ranks of this rank's node (reduce-scatter)
    intra_gather: dist.ProcessGroup  # the same ranks (all-gather)
    inter: dist.ProcessGroup  # this rank's peers (same local rank) on the other nodes
    node_size: int
    world: int
    gloo: bool  # reduce-scatter and all-gather inside the node done as all-reduces (see below)
    stages: tuple[ThreadPoolExecutor, ...] = field(default_factory=lambda: tuple(map(_stage, ("rs", "ar", "ag"))))

    @classmethod
    def from_mesh(cls, dp_mesh: DeviceMesh, node_size: int) -> "HierarchicalState":
        """Split the 1-D data-parallel mesh into (nodes, node_size); `node_size` as configured
        (0: LOCAL_WORLD_SIZE; unknown: one node). Refused in one line when it does not divide
        the mesh. Every rank of the world calls this (new groups are made collectively)."""
        world = dp_mesh.size()
        size = resolve_node_size(node_size) or world
        require(world % size == 0, "comm.node_size", size,
                f"must divide the data-parallel degree ({world}) for comm.hierarchical")
        mesh2d = dp_mesh._unflatten(0, (world // size, size), NODE_DIMS)
        gather, _ = dist.new_subgroups_by_enumeration(mesh2d.mesh.tolist())
        intra = mesh2d["local"].get_group()
        return cls(intra=intra, intra_gather=gather, inter=mesh2d["node"].get_group(), node_size=size, world=world,
                   gloo=dist.get_backend(intra) == "gloo")


def hierarchical_allreduce(tensor: torch.Tensor, state: HierarchicalState) -> torch.futures.Future[torch.Tensor]:
    """Sum `tensor` (1-D, contiguous) over all data-parallel ranks in place: reduce-scatter inside
    the node, all-reduce of this rank's shard across nodes, all-gather inside the node (any
    length: the last shard is padded with zeros). Returns a future of `tensor`; the backward goes
    on meanwhile, as with DDP's own all-reduce.

    Each step runs on its own thread, which takes the buckets in the order they come: every
    group then sees its collectives in the same order on every rank, and bucket k crosses the
    nodes while bucket k+1 is reduce-scattered. (Chaining the steps on the collectives' futures
    lets bucket k's all-gather and bucket k+1's reduce-scatter reach the node group in different
    orders on different ranks: measured, a hang at 4 ranks; and gloo's reduce-scatter has no
    future, "Work::getFuture not implemented", torch 2.13.)

    On gloo the node's steps are all-reduces: its reduce-scatter and all-gather are far slower
    than its all-reduce of the whole bucket (104 MB over 2 ranks in a namespace: 0.92 s and 0.62 s
    against 0.20 s, measured 2026-12-03), so the node sums the whole bucket and each rank keeps its
    shard, and the gather is an all-reduce of the bucket with the other shards zeroed (exact:
    x + 0 = x). Other backends (nccl) use reduce_scatter_single / all_gather_single."""
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    k, n = state.node_size, tensor.numel()
    rs, ar, ag = state.stages
    if k == 1 or state.world == k:  # one level only: a plain all-reduce over the group that has it
        group = state.inter if k == 1 else state.intra
        _then(ar, fut, lambda: dist.all_reduce(tensor, group=group), lambda: fut.set_result(tensor))
        return fut
    shard = -(-n // k)
    padded = tensor if shard * k == n else torch.cat([tensor, tensor.new_zeros(shard * k - n)])
    lo = dist.get_rank(state.intra) * shard
    part = padded[lo:lo + shard]  # this rank's shard: reduced across nodes in place

    def scatter() -> None:
        if state.gloo:  # the node's sum in full, of which this rank keeps its shard
            dist.all_reduce(padded, group=state.intra)
        else:
            dist.reduce_scatter_single(part, padded.clone(), group=state.intra)

    def gather() -> None:
        if state.gloo:  # the other shards zeroed: the node's sum is the concatenation, exactly
            padded[:lo].zero_()
            padded[lo + shard:].zero_()
            dist.all_reduce(padded, group=state.intra_gather)
        else:
            dist.all_gather_single(padded, part.clone(), group=state.intra_gather)
        if padded is not tensor:
            tensor.copy_(padded[:n])

    def reduced() -> None:
        _then(ag, fut, gather, lambda: fut.set_result(tensor))

    def scattered() -> None:
        _then(ar, fut, lambda: dist.all_reduce(part, group=state.inter), reduced)

    _then(rs, fut, scatter, scattered)
    return fut


def _then(stage: ThreadPoolExecutor, fut: torch.futures.Future, step: Callable[[], object],
          after: Callable[[], None]) -> None:
    """Run `step` on `stage`'s thread, then `after` there; an error goes to `fut` (DDP raises it
    on the training thread)."""

    def run() -> None:
        try:
            step()
            after()
        except BaseException as e:
            fut.set_exception(e)

    stage.submit(run)


def hierarchical_hook(state: HierarchicalState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: the average of the bucket over all ranks, reduced in two levels."""
    buffer = bucket.buffer()
    buffer.div_(state.world)  # as DDP's default allreduce hook: divide, then sum
    return hierarchical_allreduce(buffer, state)


def register_hierarchical_hook(model: DDP, dp_mesh: DeviceMesh, node_size: int,
                               wrap: Callable[[Callable], Callable] | None = None) -> "HierarchicalState":
    """Make `model`'s gradient reduction hierarchical (the hook wrapped by `wrap` when given: a
    timer); returns the state (its groups) for tests."""
    state = HierarchicalState.from_mesh(dp_mesh, node_size)
    model.register_comm_hook(state, wrap(hierarchical_hook) if wrap is not None else hierarchical_hook)
    return state
