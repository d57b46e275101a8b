"""Plain data parallelism with DistributedDataParallel over the mesh's "dp" dimension."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel as DDP


def apply_ddp(model: nn.Module, dp_mesh: DeviceMesh) -> nn.Module:
    """Wrap with DDP when there is more than one replica; at one replica DDP would only cost time."""
    if dp_mesh.size() == 1:
        return model
    first = next(model.parameters())  # all on this rank's device
    device_ids = [first.device.index] if first.is_cuda else None
    return DDP(model, process_group=dp_mesh.get_group(), device_ids=device_ids, gradient_as_bucket_view=True)
