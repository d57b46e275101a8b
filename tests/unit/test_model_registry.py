"""models/registry.py: `model.family` picks a family; an unknown one is one config error line."""

from __future__ import annotations

import pytest

from lmforge.config import ConfigError, ModelConfig
from lmforge.models.llama import LLAMA, Transformer
from lmforge.models.registry import FAMILIES, family_of


def test_the_default_family_is_llama() -> None:
    cfg = ModelConfig()
    assert cfg.family == "llama"
    assert family_of(cfg) is LLAMA and FAMILIES == {"llama": LLAMA}
    assert LLAMA.model_class is Transformer
    assert LLAMA.count_params(LLAMA.sizes["debug"])["total"] == sum(
        p.numel() for p in LLAMA.build(LLAMA.sizes["debug"], "cpu", 0).parameters())


def test_an_unknown_family_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"model\.family.*'gpt2'.*one of llama") as e:
        family_of(ModelConfig(family="gpt2"))
    assert "\n" not in str(e.value)


def test_an_empty_family_is_refused_by_validation() -> None:
    with pytest.raises(ConfigError, match=r"model\.family"):
        ModelConfig(family=" ").validate()
