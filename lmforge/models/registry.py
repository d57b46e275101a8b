"""Model families by `model.family`: the one place training, parallelism, serving and interop look a
family up. Adding a family is its folder under lmforge/models/ and one line in FAMILIES."""

from __future__ import annotations

from lmforge.config import ConfigError, ModelConfig
from lmforge.models.family import ModelFamily
from lmforge.models.llama import LLAMA

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (LLAMA,)}


def family_of(cfg: ModelConfig) -> ModelFamily:
    """The family `cfg.family` names; a ConfigError (one line) for an unknown name."""
    try:
        return FAMILIES[cfg.family]
    except KeyError:
        raise ConfigError("model.family", cfg.family, f"one of {', '.join(sorted(FAMILIES))}") from None
