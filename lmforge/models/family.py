"""What a model family gives the rest of lmforge: its module class, a builder, a parameter count
and its named sizes. Each family folder defines one `ModelFamily`; `models/registry.py` lists them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from lmforge.config import ModelConfig


@dataclass(frozen=True)
class ModelFamily:
    name: str  # the value of `model.family`
    # (cfg, kernels=None) -> the model, constructible on the meta device (training builds it there).
    model_class: Callable[..., nn.Module]
    # (cfg, device, seed) -> the model with its parameters initialised.
    build: Callable[[ModelConfig, torch.device | str, int | None], nn.Module]
    # cfg -> {"total", "embedding", "non_embedding", "per_layer", ["active"]} without building it.
    count_params: Callable[[ModelConfig], dict[str, int]]
    sizes: Mapping[str, ModelConfig]  # named sizes for `lmforge sizes` and `--model.size`
