"""The interface each Hugging Face family adapter implements, the error every part of the interop
raises, and the small helpers all adapters use (public, so no module reaches into another's
private names).

The family dispatch built on this interface (model_type -> adapter) is `registry.py`: it has to
import every adapter, and every adapter imports this module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch

from lmforge.config import ConfigError, ModelConfig

# Name parts that wrappers (torch.compile, activation checkpointing, DDP) add to parameter names.
WRAPPER_NAME_PARTS = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "module"})


class HFFormatError(ValueError):
    """A Hugging Face directory or config we cannot read or represent; the message is one line."""


class HFAdapter(ABC):
    """One Hugging Face model family: ModelConfig <-> config.json dict, and our state dict <->
    the family's weight names. Stateless; `registry.ADAPTERS` holds one instance per family.

    The `to_hf_*` methods expect a config this family expresses (`export_refusal` returned None):
    the registry checks that before it calls them."""

    model_type: ClassVar[str]  # config.json "model_type" this family reads and writes
    architecture: ClassVar[str]  # config.json "architectures" entry it writes
    display_name: ClassVar[str]  # the family in messages ("Llama", "Qwen2-MoE")
    mixture_of_experts: ClassVar[bool]  # exports Mixture-of-Experts models (else dense ones)
    # Also reads a config.json whose model_type is unknown but whose architectures name this one.
    reads_architecture_alone: ClassVar[bool] = False

    def export_refusal(self, cfg: ModelConfig) -> str | None:
        """Why this family cannot express `cfg` exactly, as the words after "<display_name> needs"
        in an error; None when it can. May raise HFFormatError for what no family of this kind
        expresses. The registry exports with the first family of the right kind returning None."""
        return None

    @abstractmethod
    def to_hf_config(self, cfg: ModelConfig, eos_token_id: int | None, bos_token_id: int | None,
                     dtype: torch.dtype) -> dict[str, Any]:
        """The config.json dict `transformers` builds this family from."""

    @abstractmethod
    def from_hf_config(self, d: Mapping[str, Any]) -> ModelConfig:
        """ModelConfig from this family's config.json dict; HFFormatError (one line) for what our
        model cannot represent."""

    @abstractmethod
    def to_hf_state_dict(self, sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
        """Our parameter names -> this family's, in the layout its published checkpoints use."""

    @abstractmethod
    def from_hf_state_dict(self, sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
        """This family's weight names -> ours; unknown names are an HFFormatError naming them."""


def name_list(names: Iterable[str], limit: int = 6) -> str:
    """Sorted names for a one-line message: the first `limit`, then how many more."""
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def unwrapped_name(name: str) -> str:
    """A parameter name without the parts wrappers add (torch.compile, checkpointing, DDP)."""
    return ".".join(p for p in name.split(".") if p not in WRAPPER_NAME_PARTS)


def checked_config(cfg: ModelConfig) -> ModelConfig:
    """`cfg` after ModelConfig's own checks, a failure reported as an HFFormatError."""
    try:
        cfg.validate()
    except ConfigError as e:
        raise HFFormatError(f"config.json cannot be represented: {e}") from None
    return cfg
