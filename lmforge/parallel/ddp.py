"""Plain data parallelism with DistributedDataParallel over the mesh's "dp" dimension."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel as DDP

from lmforge.config.comm import CommConfig
from lmforge.parallel.hierarchical import register_hierarchical_hook


def apply_ddp(model: nn.Module, dp_mesh: DeviceMesh, comm: CommConfig | None = None) -> nn.Module:
    """Wrap with DDP when there is more than one replica; at one replica DDP would only cost time.
    `comm.hierarchical`: gradients reduced inside each node first (lmforge.parallel.hierarchical)."""
    if dp_mesh.size() == 1:
        return model
    first = next(model.parameters())  # all on this rank's device
    device_ids = [first.device.index] if first.is_cuda else None
    ddp = DDP(model, process_group=dp_mesh.get_group(), device_ids=device_ids, gradient_as_bucket_view=True)
    if comm is not None and comm.hierarchical:
        register_hierarchical_hook(ddp, dp_mesh, comm.node_size)
    return ddp
