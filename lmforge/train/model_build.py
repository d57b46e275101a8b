"""The model as a training run needs it: the family's modules built on the meta device, then
every parallel dimension applied (lmforge.parallel.parallelize), initialised before or after
sharding. The family comes from `model.family` (lmforge/models/registry.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lmforge.config import JobConfig
from lmforge.models.common.linear import MatmulKernels
from lmforge.models.registry import family_of
from lmforge.parallel.mesh import DistInfo, ParallelMesh
from lmforge.parallel.parallelize import ParallelModel, parallelize


def build_training_model(cfg: JobConfig, mesh: ParallelMesh, info: DistInfo, say: Callable[[str], None],
                         scale_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
                         wrap_comm_hook: Callable[[Callable], Callable] | None = None) -> ParallelModel:
    """meta -> pipeline split -> TP -> EP -> AC -> compile -> FSDP2 or DDP, initialised; see
    `parallelize` (`scale_loss`: the GradScaler's, for the pipeline schedule; `wrap_comm_hook`: the
    time breakdown's timer around a DDP comm hook)."""
    with torch.device("meta"):
        # Several ranks would each time the fp32 kernels and could choose differently (their
        # results then differ in the last bits): one process only (models/common/linear.py).
        # train.matmul_kernels = "plain": the multi-process kernels in one process too (comparisons).
        fast = info.world_size == 1 and cfg.train.matmul_kernels == "auto"
        kernels = MatmulKernels.with_disk_cache() if fast else MatmulKernels(enabled=False)
        model = family_of(cfg.model).model_class(cfg.model, kernels)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"model: {n_params / 1e6:.2f}M parameters, {cfg.model.n_layers} layers, dim {cfg.model.dim}; "
        f"world size {info.world_size} ({info.backend}): {mesh.degrees.describe()}")
    return parallelize(model, mesh, cfg, device=info.device, scale_loss=scale_loss,
                       wrap_comm_hook=wrap_comm_hook)
