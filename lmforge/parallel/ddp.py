"""Plain data parallelism with DistributedDataParallel over the mesh's "dp" dimension, with one
DDP comm hook when asked: the gradient compression of `comm.compression` (lmforge.parallel.comm)
or the hierarchical all-reduce of `comm.hierarchical` (lmforge.parallel.hierarchical; the config
refuses both at once: DDP takes one hook).

Buffers are broadcast from rank 0 once, at wrap time, not before every forward
(`forward_sync_buffers=False`): ours are constants computed the same on every rank (RoPE tables)
or moved identically on every rank from all-reduced statistics (MoE expert biases), so the
per-forward broadcast bought nothing but a collective at the start of each forward, where a fast
rank's wait for a slow one hid inside "compute" (observability/breakdown.py)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel as DDP

from lmforge.config.comm import CommConfig
from lmforge.parallel.comm import CommHookState
from lmforge.parallel.comm.ddp_hooks import register_compression
from lmforge.parallel.hierarchical import register_hierarchical_hook


def apply_ddp(model: nn.Module, dp_mesh: DeviceMesh, comm: CommConfig | None = None,
              wrap_comm_hook: Callable[[Callable], Callable] | None = None) -> tuple[nn.Module, CommHookState | None]:
    """Wrap with DDP when there is more than one replica (at one replica DDP would only cost
    time); install `comm.compression`'s hook unless "none", or the hierarchical all-reduce.
    `wrap_comm_hook` wraps the hook before it is registered (a timer: DDP takes one hook, set
    once). Returns the module and the compression hook's state (None without compression)."""
    if dp_mesh.size() == 1:
        return model, None
    first = next(model.parameters())  # all on this rank's device
    device_ids = [first.device.index] if first.is_cuda else None
    ddp = DDP(model, process_group=dp_mesh.get_group(), device_ids=device_ids, gradient_as_bucket_view=True,
              forward_sync_buffers=False)
    if comm is not None and comm.hierarchical:
        register_hierarchical_hook(ddp, dp_mesh, comm.node_size, wrap_comm_hook)
    if comm is None or comm.compression == "none":
        return ddp, None
    return ddp, register_compression(ddp, comm, dp_mesh.get_group(), wrap_comm_hook)
