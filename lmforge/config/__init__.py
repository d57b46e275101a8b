"""Configs: one dataclass per component, recipes (TOML) plus `--section.key value` overrides."""

from lmforge.config.comm import CommConfig
from lmforge.config.job import (
    CheckpointConfig,
    DataConfig,
    JobConfig,
    MetricsConfig,
    OptimizerConfig,
    SchedulerConfig,
    StabilityConfig,
    TokenizerConfig,
    load_job_config,
)
from lmforge.config.loader import ConfigError, parse_override_args
from lmforge.config.model import ModelConfig, MoEConfig, RopeScalingConfig
from lmforge.config.parallel import ParallelConfig
from lmforge.config.train import TrainConfig

__all__ = [
    "CheckpointConfig", "CommConfig", "ConfigError", "DataConfig", "JobConfig", "MetricsConfig", "ModelConfig", "MoEConfig",
    "OptimizerConfig", "ParallelConfig", "RopeScalingConfig", "SchedulerConfig", "StabilityConfig", "TokenizerConfig", "TrainConfig",
    "load_job_config", "parse_override_args",
]
