"""Checkpoints on torch.distributed.checkpoint: integrity manifest, atomic publish, pruning, resume."""

from lmforge.checkpoint.manager import (
    CheckpointError,
    CheckpointManager,
    load_model_weights,
    save_model_weights,
    verify_checkpoint,
)
from lmforge.checkpoint.state import ModelOptimizerState, PerRank, PerRankState, RNGState

__all__ = ["CheckpointError", "CheckpointManager", "ModelOptimizerState", "PerRank", "PerRankState", "RNGState",
           "load_model_weights", "save_model_weights", "verify_checkpoint"]
