"""Checks of a validated JobConfig against the machine it is about to run on, before any process
group starts or any tensor is allocated: is the device there, and can the training state fit.

Kept apart from `JobConfig.validate`, which depends on the config alone (recipes for 8 x 8 GPUs
must validate on a laptop); these depend on this machine and run only when a job is launched.
"""

from __future__ import annotations

import os
from dataclasses import replace

from lmforge.config.job import JobConfig, ModelConfig
from lmforge.config.loader import ConfigError
from lmforge.train.continual import check_init_from

# fp32 weights + fp32 gradients + AdamW's two fp32 moments, per parameter (mixed precision keeps
# fp32 master weights; activations come on top, so this is a lower bound of what training needs).
TRAIN_BYTES_PER_PARAM = 4 + 4 + 8


def available_host_bytes() -> int | None:
    """Memory the kernel can give without swapping (MemAvailable), or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


_COUNTED_LAYERS = 4096  # count_params walks the layers; beyond this, extrapolate (linear in layers)


def parameter_count(model: ModelConfig) -> int:
    """Parameters of `model`, in constant time also for absurd layer counts (10**12 layers must be
    refused in a second, not counted one by one)."""
    from lmforge.models.registry import family_of

    count_params = family_of(model).count_params
    if model.n_layers <= _COUNTED_LAYERS:
        return count_params(model)["total"]
    half = count_params(replace(model, n_layers=_COUNTED_LAYERS // 2))["total"]
    full = count_params(replace(model, n_layers=_COUNTED_LAYERS))["total"]
    return full + (full - half) * (model.n_layers - _COUNTED_LAYERS) // (_COUNTED_LAYERS // 2)


def training_state_bytes(cfg: JobConfig, world_size: int) -> tuple[int, int]:
    """(parameters, bytes of weights + gradients + AdamW state on one rank). Sharding over
    dp_shard, tp and pp divides the state; replication (dp_replicate) does not."""
    params = parameter_count(cfg.model)
    r = cfg.parallel.resolved(world_size)
    shards = max(r.dp_shard, 1) * r.tp * r.pp
    return params, -(-params * TRAIN_BYTES_PER_PARAM // shards)


def fixed_buffer_bytes(cfg: JobConfig) -> int:
    """What every rank allocates whatever the sharding: the RoPE tables (built in float64, about
    16 bytes per position and head-dim entry at their peak) and one micro-batch's logits in fp32
    with their gradient and softmax (3 copies). Activations come on top."""
    m, t = cfg.model, cfg.train
    return 16 * m.max_seq_len * m.head_dim + 3 * 4 * t.micro_batch_size * t.seq_len * m.vocab_size


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_memory_fits(cfg: JobConfig, world_size: int, local_ranks: int = 1) -> None:
    """Refuse a model whose training state cannot fit, with the estimate, before allocation.

    On CPU the `local_ranks` processes of this machine share its RAM; on CUDA each rank has one
    device of its own.
    """
    params, per_rank = training_state_bytes(cfg, world_size)
    per_rank += fixed_buffer_bytes(cfg)
    import torch

    on_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    if on_cuda:
        where, have, need = "per GPU", torch.cuda.get_device_properties(0).total_memory, per_rank
    else:
        where, have, need = "of host memory available", available_host_bytes(), per_rank * local_ranks
    if have is None or need <= have:
        return
    raise ConfigError("model", f"{params:,} parameters",
                      f"training needs at least {_gib(need)} for weights, gradients, AdamW state, RoPE "
                      f"tables and logits ({TRAIN_BYTES_PER_PARAM} bytes per parameter{f' x {local_ranks} ranks' if not on_cuda and local_ranks > 1 else ''}"
                      f", sharded over dp_shard x tp x pp) but this machine has {_gib(have)} {where}; "
                      "use a smaller model.dim / n_layers or shard over more ranks")


def preflight(cfg: JobConfig, world_size: int, local_ranks: int = 1) -> None:
    """Every machine-dependent check of the config (the device string itself is checked by the CLI,
    lmforge.cli_errors.check_device)."""
    check_memory_fits(cfg, world_size, local_ranks)
    check_init_from(cfg)  # train.init_from: found, verified, its shapes those of the recipe's model
