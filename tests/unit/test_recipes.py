"""Shipped GPU recipes: their models are the named sizes and their layouts pass the mesh checker
at the world size each is written for (and fail at a wrong one)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest

from lmforge.config import ConfigError, load_job_config
from lmforge.models.llama import SIZES

RECIPES = Path(__file__).resolve().parents[2] / "recipes"

GPU_RECIPES = {
    "llama3-8b-fsdp8.toml": ("8B", 8, {"dp_shard": 8, "tp": 1, "pp": 1}),
    "llama3-70b-fsdp8-tp8.toml": ("70B", 64, {"dp_shard": 8, "tp": 8, "pp": 1}),
    "llama3-405b-pp8-tp8-fsdp8.toml": ("405B", 512, {"dp_shard": 8, "tp": 8, "pp": 8}),
    "mixtral-8x7b.toml": ("mixtral-8x7b", 64, {"dp_shard": 64, "tp": 1, "pp": 1, "ep": 8}),
    "deepseek-v3-like.toml": ("deepseek-v3-like", 2048, {"dp_shard": 128, "tp": 1, "pp": 16, "ep": 64}),
}


@pytest.mark.parametrize("name", list(GPU_RECIPES))
def test_gpu_recipe_layout_is_valid(name: str) -> None:
    size, world, degrees = GPU_RECIPES[name]
    cfg = load_job_config(str(RECIPES / name), world_size=world)
    assert asdict(cfg.model) == asdict(SIZES[size])
    resolved = cfg.parallel.resolved(world)
    assert {k: getattr(resolved, k) for k in degrees} == degrees
    with pytest.raises(ConfigError, match="parallel"):
        load_job_config(str(RECIPES / name), world_size=world // 2)


def test_tiny_moe_recipe_is_the_named_size() -> None:
    cfg = load_job_config(str(RECIPES / "tiny-moe.toml"))
    assert asdict(cfg.model) == asdict(SIZES["tiny-moe"])
