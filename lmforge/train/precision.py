"""Mixed precision policy: parameters and optimizer state stay fp32 (the master weights), matmuls
run in bf16/fp16 under autocast; fp16 adds dynamic loss scaling (GradScaler).

`train.mixed_precision = "auto"` picks what the hardware runs natively, because a reduced
precision the hardware only emulates is not a speed-up but a slow-down (bf16 matmuls on an
AVX2-only CPU run ~100x slower than fp32):

- CUDA GPU with bf16 tensor cores -> bf16
- CUDA GPU without (Volta, Turing) -> fp16 with dynamic loss scaling
- CPU with native bf16 (AMX or AVX512_BF16) -> bf16, unless `ONEDNN_MAX_CPU_ISA` caps oneDNN (torch's
  CPU matmul backend for bf16) below those instructions: then oneDNN emulates bf16 and it is fp32
- any other CPU -> fp32

`choose_precision` is pure (the hardware comes in as a `Hardware` value) so every case can be
tested on any machine; `detect_hardware` reads this machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lmforge.tensors.cpu_features import (
    cpu_native_feature,
    onednn_cap_from_env,
    parse_cpu_flags,
    read_cpuinfo,
)
from lmforge.tensors.dtypes import DTYPES

if TYPE_CHECKING:
    from lmforge.config import JobConfig

AUTO = "auto"


@dataclass(frozen=True)
class Hardware:
    """What the precision choice depends on. `cpu_capability` is torch's ATen dispatch level
    (torch.backends.cpu.get_cpu_capability(): "AVX2", "AVX512", ...); `cpu_flags` the CPU's
    feature flags (/proc/cpuinfo); `onednn_isa_cap` the ISA oneDNN is capped at
    (ONEDNN_MAX_CPU_ISA, e.g. "AVX2"; "" when uncapped); `cuda_bf16` whether the GPU has bf16
    tensor cores (not emulation). `device_type` is where training runs: "cuda" or "cpu"."""

    device_type: str
    cuda_bf16: bool = False
    cpu_capability: str = "DEFAULT"
    cpu_flags: frozenset[str] = frozenset()
    device_name: str = ""
    onednn_isa_cap: str = ""


@dataclass(frozen=True)
class PrecisionChoice:
    mode: str  # "fp32" | "bf16" | "fp16"
    reason: str  # one short phrase for the run header and config.json
    native: bool  # the hardware runs `mode`'s matmuls natively (False: expect a large slowdown)


def _no_native(dtype: str, hw: Hardware) -> str:
    """Why `dtype` is not native here, for a reason string: the CPU lacks it, or a oneDNN cap hides it."""
    present = cpu_native_feature(dtype, hw.cpu_flags)
    if present is not None:
        return f"ONEDNN_MAX_CPU_ISA={hw.onednn_isa_cap} keeps oneDNN from the CPU's native {dtype} ({present})"
    return f"CPU has no native {dtype} ({hw.cpu_capability})"


def choose_precision(requested: str, hw: Hardware) -> PrecisionChoice:
    """Resolve `requested` ("auto" or an explicit mode) on `hw` into a concrete mode and reason."""
    if hw.device_type == "cuda":
        gpu = hw.device_name or "CUDA GPU"
        if requested == AUTO:
            if hw.cuda_bf16:
                return PrecisionChoice("bf16", f"auto: {gpu} has bf16 tensor cores: bf16", True)
            return PrecisionChoice("fp16", f"auto: {gpu} has no bf16 tensor cores: fp16 with dynamic loss scaling",
                                   True)
        native = requested != "bf16" or hw.cuda_bf16
        note = "" if native else f" ({gpu} has no bf16 tensor cores: emulated)"
        return PrecisionChoice(requested, f"set in the config{note}", native)
    if requested == AUTO:
        bf16_feature = cpu_native_feature("bf16", hw.cpu_flags, hw.onednn_isa_cap)
        if bf16_feature is not None:
            return PrecisionChoice("bf16", f"auto: CPU has native bf16 ({bf16_feature}): bf16", True)
        return PrecisionChoice("fp32", f"auto: {_no_native('bf16', hw)}: fp32", True)
    if requested == "fp32":
        return PrecisionChoice("fp32", "set in the config", True)
    feature = cpu_native_feature(requested, hw.cpu_flags, hw.onednn_isa_cap)
    if feature is not None:
        return PrecisionChoice(requested, f"set in the config; CPU has native {requested} ({feature})", True)
    return PrecisionChoice(requested, f"set in the config; {_no_native(requested, hw)}: emulated, slow", False)


def detect_hardware(device: str = "auto", cpuinfo: str | None = None) -> Hardware:
    """This machine as `choose_precision` needs it. `device` is train.device ("auto" = CUDA when
    available)."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    flags = parse_cpu_flags(read_cpuinfo() if cpuinfo is None else cpuinfo)
    capability = torch.backends.cpu.get_cpu_capability()
    onednn_cap = onednn_cap_from_env()
    if use_cuda and torch.cuda.is_available():
        # This rank's GPU, read without making it current: that would create a CUDA context on it
        # (and on GPU 0 when switching back) before the trainer picks the device.
        idx = int(os.environ.get("LOCAL_RANK", "0") or 0) % torch.cuda.device_count()
        if torch.version.hip:
            bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        else:
            bf16 = torch.cuda.get_device_capability(idx)[0] >= 8  # Ampere and later: bf16 tensor cores
        return Hardware("cuda", cuda_bf16=bf16, cpu_capability=capability, cpu_flags=flags,
                        device_name=torch.cuda.get_device_name(idx))
    return Hardware("cpu", cpu_capability=capability, cpu_flags=flags, onednn_isa_cap=onednn_cap)


def resolve_job_precision(cfg: JobConfig, hw: Hardware | None = None) -> tuple[JobConfig, PrecisionChoice]:
    """A copy of `cfg` whose train.mixed_precision is concrete and whose
    train.mixed_precision_reason says why; the caller's config is not changed.

    Resolving is idempotent: a resolved config (e.g. a run's config.json read back) resolves to
    the same mode again, with the reason re-derived for this machine."""
    hw = hw if hw is not None else detect_hardware(cfg.train.device)
    choice = choose_precision(cfg.train.mixed_precision, hw)
    train = dataclasses.replace(cfg.train, mixed_precision=choice.mode, mixed_precision_reason=choice.reason)
    return dataclasses.replace(cfg, train=train), choice


def measure_slowdown(mode: str, device: torch.device | str = "cpu", n: int = 128, seconds: float = 0.05,
                     rounds: int = 2) -> float:
    """How many times slower `mode`'s n x n matmuls run than fp32's here (~0.3 s on a CPU).

    Alternates the two dtypes `rounds` times, each timed in ~1 ms batches, and keeps each one's
    best rate, so load from other processes skews neither side. On CPU it runs on one thread
    (restored after): both dtypes scale alike with threads, and a multi-threaded matmul on a busy
    machine measures threads waiting for each other rather than the arithmetic. At n = 128 an
    emulated bf16 is ~30x slower than fp32 on a Zen 3; at the model's larger shapes it is worse
    (~100x or more), so the figure is a lower bound."""
    from lmforge.observability.peak import measure_matmul_flops, on_threads

    best = {mode: 0.0, "fp32": 0.0}
    with on_threads(1 if torch.device(device).type == "cpu" else torch.get_num_threads()):
        for _ in range(rounds):
            for key in best:
                flops, _ = measure_matmul_flops(device, key, n=n, seconds=seconds, batch_seconds=0.001)
                best[key] = max(best[key], flops)
    return best["fp32"] / best[mode]


def warn_if_emulated(choice: PrecisionChoice, device: torch.device) -> None:
    """One warning line, with the measured slowdown, for a reduced precision this CPU only emulates
    (an explicit `bf16` without AMX or AVX512_BF16): it runs, slowly, as asked."""
    if choice.native or device.type != "cpu":
        return
    logging.getLogger("lmforge.train").warning(
        "train.mixed_precision = %r on a CPU without native %s: its matmuls measured %.0fx slower than fp32 here "
        "(128x128, one thread); 'auto' would train in fp32", choice.mode, choice.mode, measure_slowdown(choice.mode))


def autocast_context(mode: str, device: torch.device) -> contextlib.AbstractContextManager:
    if mode == "fp32":
        return contextlib.nullcontext()
    if mode not in DTYPES:
        raise ValueError(f"mixed precision {mode!r} is not resolved (one of fp32, bf16, fp16 expected)")
    return torch.autocast(device_type=device.type, dtype=DTYPES[mode])


def build_grad_scaler(mode: str, device: torch.device) -> torch.amp.GradScaler:
    """Enabled only for fp16 (bf16 has fp32's exponent range and needs no scaling)."""
    return torch.amp.GradScaler(device.type, enabled=(mode == "fp16"))


def check_same_precision_on_all_ranks(choice: PrecisionChoice) -> None:
    """Every rank resolves "auto" itself (same machine kind, same answer); nodes of different
    kinds would not, and ranks must not mix precisions: refuse in one line."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    modes: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(modes, choice.mode)
    if len(set(modes)) > 1:
        from lmforge.config import ConfigError

        by_rank = ", ".join(f"rank {r}: {m}" for r, m in enumerate(modes))
        raise ConfigError("train.mixed_precision", "auto", f"resolves differently across ranks ({by_rank}); "
                          "set fp32, bf16 or fp16 explicitly")
