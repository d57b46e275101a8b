"""The one table of dtype names: lmforge's short names in configs and CLIs (fp32, bf16, fp16), the
aliases users type (bfloat16, half, ...), and the names Hugging Face's config.json uses."""

from __future__ import annotations

import torch

# The training precisions, as `train.mixed_precision`, `--dtype` and the peak FLOP/s cache name them.
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Names a user may type for them (torch's own spellings included), to the short name.
ALIASES: dict[str, str] = {
    "fp32": "fp32", "float32": "fp32", "float": "fp32",
    "bf16": "bf16", "bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16",
}
# `torch_dtype` in a Hugging Face config.json.
HF_NAMES: dict[torch.dtype, str] = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def short_name(dtype: torch.dtype | str) -> str | None:
    """'fp32' | 'bf16' | 'fp16' for a torch dtype or any alias; None for other dtypes."""
    name = str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else str(dtype).strip().lower()
    return ALIASES.get(name)
