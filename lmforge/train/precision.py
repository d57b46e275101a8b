"""Mixed precision policy: parameters and optimizer state stay fp32 (the master weights), matmuls
run in bf16/fp16 under autocast; fp16 adds dynamic loss scaling (GradScaler)."""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_context(mode: str, device: torch.device) -> contextlib.AbstractContextManager:
    if mode == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[mode])


def build_grad_scaler(mode: str, device: torch.device) -> torch.amp.GradScaler:
    """Enabled only for fp16 (bf16 has fp32's exponent range and needs no scaling)."""
    return torch.amp.GradScaler(device.type, enabled=(mode == "fp16"))
