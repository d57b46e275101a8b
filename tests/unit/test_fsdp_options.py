"""FSDP options do what they say or are refused: `parallel.cpu_offload`, `fsdp_param_dtype` and
`fsdp_reshard_after_forward` need FSDP (dp_shard > 1); without it (one process, DDP) the config
refuses them in one line instead of ignoring them. With FSDP they reach fully_shard, for the
blocks and (ep > 1) the experts alike. cpu_offload on CUDA gets a CPU backend in the group."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.fsdp import CPUOffloadPolicy

from lmforge.config import ConfigError, ParallelConfig, load_job_config, parse_override_args
from lmforge.parallel.fsdp import fsdp_kwargs
from lmforge.parallel.mesh import choose_backend
from tests.helpers.config import BASE

OPTIONS = [("cpu_offload", "true", True), ("fsdp_param_dtype", "bf16", "bf16"),
           ("fsdp_reshard_after_forward", "never", "never"), ("fsdp_reshard_after_forward", "always", "always")]
NO_FSDP = [  # (world size, layout): dp_shard resolves to 1
    (1, []),
    (2, ["--parallel.dp_replicate", "2"]),  # DDP
    (2, ["--parallel.dp_shard", "1", "--parallel.dp_replicate", "2"]),
]


@pytest.mark.parametrize("key,text,value", OPTIONS, ids=[f"{o[0]}={o[1]}" for o in OPTIONS])
@pytest.mark.parametrize("world,layout", NO_FSDP, ids=["single", "ddp-auto", "ddp-explicit"])
def test_fsdp_option_without_fsdp_is_refused(key: str, text: str, value: object, world: int,
                                              layout: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_job_config(None, parse_override_args([*BASE, *layout, f"--parallel.{key}", text]), world_size=world)
    assert err.value.key == f"parallel.{key}" and err.value.value == value
    message = str(err.value)
    assert "\n" not in message
    assert "dp_shard > 1" in message and f"world size {world}" in message


@pytest.mark.parametrize("key,text,value", OPTIONS, ids=[f"{o[0]}={o[1]}" for o in OPTIONS])
def test_fsdp_option_with_fsdp_is_accepted(key: str, text: str, value: object) -> None:
    cfg = load_job_config(None, parse_override_args([*BASE, f"--parallel.{key}", text]), world_size=2)
    assert cfg.parallel.resolved(2).dp_shard == 2 and getattr(cfg.parallel, key) == value


def test_defaults_pass_without_fsdp() -> None:
    cfg = load_job_config(None, parse_override_args(BASE), world_size=1)
    assert cfg.parallel.resolved(1).dp_shard == 1


def test_fsdp_kwargs_carry_the_options() -> None:
    cpu = torch.device("cpu")
    plain = fsdp_kwargs(None, ParallelConfig(), cpu)  # type: ignore[arg-type]
    assert plain["mp_policy"].param_dtype == torch.float32 and plain["mp_policy"].reduce_dtype == torch.float32
    assert "offload_policy" not in plain
    both = fsdp_kwargs(None, ParallelConfig(fsdp_param_dtype="bf16", cpu_offload=True), cpu)  # type: ignore[arg-type]
    assert both["mp_policy"].param_dtype == torch.bfloat16 and both["mp_policy"].reduce_dtype == torch.float32
    assert isinstance(both["offload_policy"], CPUOffloadPolicy) and both["offload_policy"].pin_memory is False
    gpu = fsdp_kwargs(None, ParallelConfig(cpu_offload=True), torch.device("cuda", 0))  # type: ignore[arg-type]
    assert gpu["offload_policy"].pin_memory is True  # pinned host memory for the copies in (GPU only)


@pytest.mark.parametrize("backend,device,offload,expected", [
    ("auto", "cpu", False, "gloo"),
    ("auto", "cpu", True, "gloo"),  # on CPU the tensors already live in host memory
    ("auto", "cuda", False, "nccl"),
    ("auto", "cuda", True, "cpu:gloo,cuda:nccl"),
    ("nccl", "cuda", True, "cpu:gloo,cuda:nccl"),
    ("nccl", "cuda", False, "nccl"),
    ("gloo", "cuda", True, "gloo"),  # gloo runs host collectives itself
    ("gloo", "cpu", False, "gloo"),
])
def test_backend_choice(backend: str, device: str, offload: bool, expected: str) -> None:
    assert choose_backend(backend, device, offload) == expected
