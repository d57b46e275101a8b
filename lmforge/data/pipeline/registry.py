"""Every step type a pipeline TOML may name: the per-shard steps (`steps.py`) and the global ones
(`dedup.py`, `synthetic.py`), which cut the chain into stages (`executor.py`).

Why a module of its own: a global step module imports `GlobalStep` from `dedup.py`, so `dedup.py`
cannot also list it without an import cycle; a new step is one line here.
"""

from __future__ import annotations

from lmforge.data.pipeline.dedup import GLOBAL_STEP_TYPES as DEDUP_STEP_TYPES
from lmforge.data.pipeline.dedup import GlobalStep
from lmforge.data.pipeline.steps import STEP_TYPES
from lmforge.data.pipeline.synthetic import SyntheticConfig, SyntheticStep

__all__ = ["ALL_STEP_TYPES", "GLOBAL_STEP_TYPES", "STEP_TYPES"]

GLOBAL_STEP_TYPES: dict[str, tuple[type[GlobalStep], type]] = {
    **DEDUP_STEP_TYPES,
    "synthetic": (SyntheticStep, SyntheticConfig),
}
ALL_STEP_TYPES: dict[str, tuple[type, type]] = {**STEP_TYPES, **GLOBAL_STEP_TYPES}
