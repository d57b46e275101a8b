"""Plain data parallelism with DistributedDataParallel over the mesh's "dp" dimension, with the
gradient compression of `comm.compression` as a DDP comm hook (lmforge.parallel.comm)."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel as DDP

from lmforge.config.comm import CommConfig
from lmforge.parallel.comm import CommHookState
from lmforge.parallel.comm.ddp_hooks import register_compression


def apply_ddp(model: nn.Module, dp_mesh: DeviceMesh,
              comm: CommConfig | None = None) -> tuple[nn.Module, CommHookState | None]:
    """Wrap with DDP when there is more than one replica (at one replica DDP would only cost
    time); install `comm.compression`'s hook unless "none". Returns the module and the hook's state."""
    if dp_mesh.size() == 1:
        return model, None
    first = next(model.parameters())  # all on this rank's device
    device_ids = [first.device.index] if first.is_cuda else None
    ddp = DDP(model, process_group=dp_mesh.get_group(), device_ids=device_ids, gradient_as_bucket_view=True)
    if comm is None or comm.compression == "none":
        return ddp, None
    return ddp, register_compression(ddp, comm, dp_mesh.get_group())
