"""Checkpoints on torch.distributed.checkpoint: integrity manifest, atomic publish, pruning, resume.

One concern per module, lowest first (each imports only those above it):

    errors.py        CheckpointError, raised by all of them
    formats.py       how tensors are stored (lossy optimizer moments, tensor digests)
    state.py         Stateful wrappers: model + optimizer, per-rank state, RNG
    manifest.py      manifest, integrity check (verify_checkpoint), atomic publish
    collective.py    rank 0 decides, every rank gets its answer
    dcp_io.py        state <-> DCP keys; DCP writes and loads of any stored form
    weights.py       weights-only checkpoints (save_model_weights, load_model_weights)
    weights_run.py   a run directory holding one weights-only checkpoint (import, prune, watermark)
    async_writer.py  the writer thread of async saves
    manager.py       CheckpointManager: save, resume, load, retention
    tiers.py         memory and disk tiers of a training run
    tools.py         `lmforge ckpt` (ls, verify, inspect, convert)
"""

from lmforge.checkpoint.errors import CheckpointError
from lmforge.checkpoint.manager import CheckpointManager
from lmforge.checkpoint.manifest import verify_checkpoint
from lmforge.checkpoint.state import ModelOptimizerState, PerRank, PerRankState, RNGState
from lmforge.checkpoint.weights import load_model_weights, save_model_weights

__all__ = ["CheckpointError", "CheckpointManager", "ModelOptimizerState", "PerRank", "PerRankState", "RNGState",
           "load_model_weights", "save_model_weights", "verify_checkpoint"]
