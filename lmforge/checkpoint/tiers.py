"""Two checkpoint tiers: frequent snapshots in host memory, less frequent durable ones on disk.

Why two: a durable checkpoint costs disk bandwidth, so it is taken every few hundred steps; a
crashed worker then loses up to that many steps. A snapshot in host RAM (`/dev/shm`, a tmpfs
that outlives the process but not the machine) is cheap enough to take every few steps. Both are
ordinary lmforge checkpoints (manifest, atomic publish), so resume "auto" can take the newest
valid one of either tier; the memory tier is always full, exact and uncompressed (it exists to
be fast), the storage options (zstd, lossy moments, incremental) apply to the durable tier.

Both tiers share one writer process group and never write at the same time (saving to one tier
first waits for the other's save in progress).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch.distributed as dist

from lmforge.checkpoint.errors import CheckpointError
from lmforge.checkpoint.manager import CheckpointManager
from lmforge.config.job import CheckpointConfig
from lmforge.storage.layout import step_of

__all__ = ["TieredCheckpoints", "memory_root"]

log = logging.getLogger(__name__)


def memory_root(memory_dir: str | Path, run_dir: Path) -> Path:
    """This run's folder in the memory tier: the run's name plus a hash of its absolute path, so a
    restarted job finds its snapshots and two runs never share them."""
    key = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:10]
    return Path(memory_dir) / f"{Path(run_dir).resolve().name}-{key}"


class TieredCheckpoints:
    """The durable tier (`disk`) and, when `memory_interval > 0`, the memory tier (`memory`).
    Collective like CheckpointManager: every rank calls every method."""

    def __init__(self, cfg: CheckpointConfig, run_dir: Path) -> None:
        self.cfg = cfg
        distributed = dist.is_available() and dist.is_initialized()
        async_save = cfg.async_mode == "async"
        # The writer thread runs collectives; give it a group of its own so they never interleave
        # with the training step's.
        group = dist.new_group(backend="gloo") if (async_save and distributed) else None
        self.disk = CheckpointManager(Path(run_dir) / cfg.folder, cfg.keep_last, group, async_save=async_save,
                                      compression=cfg.compression, optimizer_states=cfg.optimizer_states,
                                      quant_block=cfg.quant_block, full_every=cfg.full_every)
        self.memory = (CheckpointManager(memory_root(cfg.memory_dir, run_dir), cfg.memory_keep, group,
                                         async_save=async_save) if cfg.memory_interval else None)
        self._rank0 = not distributed or dist.get_rank() == 0

    def tiers(self) -> list[tuple[str, CheckpointManager]]:
        return [("disk", self.disk)] + ([("memory", self.memory)] if self.memory else [])

    def due(self, step: int, final: bool) -> str | None:
        """Which tier saves at `step` ("disk" wins when both are due), or None."""
        if final or step % self.cfg.interval == 0:
            return "disk"
        if self.memory is not None and step % self.cfg.memory_interval == 0:
            return "memory"
        return None

    def save(self, step: int, state: Mapping[str, Any], tier: str = "disk") -> Path:
        mgr, other = (self.memory, self.disk) if tier == "memory" else (self.disk, self.memory)
        if mgr is None:
            raise ValueError("memory tier is off (checkpoint.memory_interval = 0)")
        if other is not None:
            other.wait()  # one writer at a time on the shared group
        return mgr.save(step, state)

    def wait(self) -> None:
        for _, mgr in self.tiers():
            mgr.wait()

    def close(self) -> None:
        for _, mgr in self.tiers():
            mgr.close()

    def stats(self) -> list[tuple[str, dict[str, float]]]:
        return [(name, rec) for name, mgr in self.tiers() for rec in mgr.stats()]

    def latest_valid(self) -> Path | None:
        found = [p for _, mgr in self.tiers() if (p := mgr.latest_valid()) is not None]
        return max(found, key=step_of, default=None)

    def resolve_resume(self, spec: str) -> Path | None:
        """As CheckpointManager.resolve_resume; "auto" takes the newest valid checkpoint of either
        tier (and a valid memory snapshot when every durable one is damaged)."""
        if str(spec).strip().lower() != "auto" or self.memory is None:
            return self.disk.resolve_resume(spec)
        snapshot = self.memory.latest_valid()
        try:
            durable = self.disk.resolve_resume("auto")
        except CheckpointError:
            if snapshot is None:
                raise
            durable = None
        if snapshot is not None and (durable is None or step_of(snapshot) > step_of(durable)):
            log.warning("resuming from the memory-tier snapshot %s (newer than the durable checkpoint %s)",
                        snapshot, durable)
            return snapshot
        return durable

    def newest_valid_before(self, step: int) -> tuple[Path | None, list[tuple[Path, str]]]:
        """The newest checkpoint of either tier saved before `step` that verifies (an incremental
        one only with its base), and the newer invalid ones skipped on the way with why. Local,
        not collective: one rank decides (a rollback target) and shares the answer."""
        self.wait()  # a save in flight may still publish or prune
        found = [(step_of(p), p, mgr) for _, mgr in self.tiers() for p in mgr.list_checkpoints()]
        skipped: list[tuple[Path, str]] = []
        for s, p, mgr in sorted(found, key=lambda t: t[0], reverse=True):
            if s >= step:
                continue
            verdict = mgr.verify_local(p)
            if verdict.ok:
                return p, skipped
            skipped.append((p, verdict.reason))
        return None, skipped

    def load(self, path: Path, state: Mapping[str, Any]) -> int:
        self.wait()  # either tier's writer may still be copying the tensors this load overwrites
        mgr = self.memory if (self.memory is not None and Path(path).parent == self.memory.root) else self.disk
        return mgr.load(path, state)

    def clear_memory(self) -> None:
        """Delete this run's memory-tier snapshots (a fresh start, or a finished run: they would
        only hold RAM). Collective."""
        if self.memory is None:
            return
        self.memory.wait()
        if self._rank0 and self.memory.root.exists():
            shutil.rmtree(self.memory.root, ignore_errors=True)
        if dist.is_available() and dist.is_initialized():
            dist.barrier(group=self.memory.process_group)
