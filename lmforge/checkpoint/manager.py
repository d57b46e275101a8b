"""CheckpointManager: when and where a run's checkpoints are saved, which one a resume loads, and
which are kept. How a checkpoint is checked (manifest.py), how state becomes DCP keys and back
(dcp_io.py) and how rank 0's decisions reach every rank (collective.py) live beside it.

Saving writes into `step-N.tmp/` (every rank its shards), then rank 0 writes the manifest, fsyncs
and renames to `step-N/`; so a crash at any point leaves either the old state or a complete new
checkpoint. Pruning runs only after the new one is published and checked, and never touches it.

Distributed: every public method except `list_checkpoints` and `verify_local` is collective when
a process group is in use (all ranks of the group must call it). Decisions that read files (is it
valid? which is the newest valid one?) are made by rank 0 alone and broadcast, so all ranks act
on the same answer even if the filesystem changes under them, and the hashing is done once, not
once per rank. DCP itself needs a filesystem shared by all ranks.
"""

from __future__ import annotations

import copy
import logging
import shutil
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lmforge.checkpoint.async_writer import AsyncWriter
from lmforge.checkpoint.collective import barrier, is_distributed, on_rank0, rank_and_world
from lmforge.checkpoint.dcp_io import (
    check_state_keys,
    flat_state_for_save,
    load_state,
    save_flat,
)
from lmforge.checkpoint.errors import CheckpointError, first_line
from lmforge.checkpoint.formats import encode_moments, tensor_digest
from lmforge.checkpoint.manifest import (
    REPLACED_SUFFIX,
    UNFINISHED_SUFFIX,
    Verdict,
    base_of,
    publish_dir,
    read_manifest,
    unfinished_dir,
    verify_checkpoint,
    write_manifest,
)
from lmforge.storage.explain import describe_os_error, diagnose_write_failure
from lmforge.storage.layout import step_dir_name, step_of

__all__ = ["CheckpointManager"]

log = logging.getLogger(__name__)


def _step_and_leftover(path: Path) -> tuple[int, bool]:
    """(N, whether it is a crash leftover) for `step-N`, `step-N.tmp` (an unfinished save) and
    `step-N.old` (a replaced checkpoint `publish_dir` moved aside); (-1, False) for other names."""
    name = path.name
    if name.endswith(REPLACED_SUFFIX):
        name = name.removesuffix(REPLACED_SUFFIX)
        return (-1, False) if name.endswith(UNFINISHED_SUFFIX) else (step_of(name), True)
    return step_of(name), name.endswith(UNFINISHED_SUFFIX)


@dataclass
class LastFullCheckpoint:
    """The last full checkpoint this manager wrote, with this rank's digest of every stored tensor."""

    path: Path
    digests: dict[str, str]
    world: int


class CheckpointManager:
    """Saves, verifies, lists, prunes and loads checkpoints under `root` (see the module docstring).

    `process_group`: the group whose ranks save and load together (None: the default group when
    torch.distributed is initialised, else single-process); with `async_save` pass a group of its
    own (e.g. `dist.new_group(backend="gloo")`), since the writer thread runs collectives on it
    while training runs its own. `keep_last`: how many checkpoints to keep; older ones are deleted
    after a new one is published (never the base of a kept incremental one).

    Storage options: `async_save` (stage a copy, write in a background thread; see `save`),
    `compression` ("none" | "zstd": lossless, DCP's ZStandard stream extension, decompressed on
    load), `optimizer_states` ("fp32" | "bf16" | "int8": how optimizer moments are stored, see
    formats.py; weights are always exact), `full_every` (0: every checkpoint full; k: a full one
    then k-1 incremental ones that store only tensors whose content changed since that full one)."""

    def __init__(self, root: Path, keep_last: int, process_group: dist.ProcessGroup | None = None, *,
                 async_save: bool = False, compression: str = "none", optimizer_states: str = "fp32",
                 quant_block: int = 256, full_every: int = 0) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last}: must be >= 1")
        if compression not in ("none", "zstd"):
            raise ValueError(f"compression={compression!r}: must be 'none' or 'zstd'")
        if optimizer_states not in ("fp32", "bf16", "int8"):
            raise ValueError(f"optimizer_states={optimizer_states!r}: must be 'fp32', 'bf16' or 'int8'")
        if quant_block < 1 or full_every < 0:
            raise ValueError(f"quant_block={quant_block}, full_every={full_every}: must be >= 1 and >= 0")
        self.root = Path(root)
        self.keep_last = keep_last
        self.process_group = process_group
        self.async_save = async_save
        self.compression = compression
        self.optimizer_states = optimizer_states
        self.quant_block = quant_block
        self.full_every = full_every
        self._verified: dict[str, Any] = {}  # resolved path -> file fingerprint hashed OK by this manager
        self._lock = threading.Lock()  # _verified is touched by the writer thread too
        self._writer = AsyncWriter()  # the thread async saves are written in
        self._base: LastFullCheckpoint | None = None
        self._since_full = 0
        self._records: list[dict[str, float]] = []

    def verify_local(self, path: Path, deep: bool = True) -> Verdict:
        """`verify_checkpoint` of `path` on this rank alone (not collective), remembering the
        checkpoints it hashed OK so that verifying one again (resume, then load) costs no hashing."""
        return verify_checkpoint(path, deep=deep, cache=self._verified)

    # -- queries --

    def list_checkpoints(self) -> list[Path]:
        """Published checkpoint directories (`step-N`, valid or not), oldest first. Local, not collective."""
        return [p for _, p in self._scan(include_tmp=False)]

    def _scan(self, include_tmp: bool) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            step = step_of(p)
            if step >= 0 and p.is_dir() and (include_tmp or not p.name.endswith(UNFINISHED_SUFFIX)):
                out.append((step, p))
        # Same step: the published one sorts after its .tmp, so it is tried first from the newest end.
        return sorted(out, key=lambda sp: (sp[0], not sp[1].name.endswith(UNFINISHED_SUFFIX)))

    def verify(self, path: Path) -> tuple[bool, str]:
        """(valid?, reason). Collective when distributed: rank 0 checks, all ranks get its answer."""
        v = on_rank0(self.process_group, lambda: self.verify_local(Path(path)))
        return v.ok, v.reason

    def _walk(self) -> tuple[Path | None, list[tuple[Path, str]]]:
        """(newest valid checkpoint or None, [(skipped invalid one, why)]), newest first."""
        skipped = []
        for _, p in reversed(self._scan(include_tmp=True)):
            if p.name.endswith(UNFINISHED_SUFFIX):  # a save that never finished: never a candidate, never a blocker
                log.warning("skipping unfinished save %s (never published; ignored)", p)
                continue
            v = self.verify_local(p)
            if v.ok:
                return p, skipped
            log.warning("skipping invalid checkpoint %s: %s", p, v.reason)
            skipped.append((p, v.reason))
        return None, skipped

    def latest_valid(self) -> Path | None:
        """The newest valid checkpoint, skipping (with a warning each) invalid newer ones, incl.
        leftover `.tmp` directories; None when there is none. Collective when distributed."""
        return on_rank0(self.process_group, lambda: self._walk()[0])

    def resolve_resume(self, spec: str) -> Path | None:
        """Where to resume from. "none" -> None (fresh start); "auto" -> the newest valid
        checkpoint, or None when there are no checkpoints yet; but CheckpointError when there are
        some and none is valid (a silent restart from scratch would discard the run's progress).
        Anything else is a checkpoint directory that must be valid, else CheckpointError.
        Collective when distributed."""
        s = str(spec).strip()
        if s.lower() == "none":
            return None
        if s.lower() == "auto":

            def auto() -> Path | None:
                found, skipped = self._walk()
                if found is None and skipped:
                    newest, why = skipped[0]
                    raise CheckpointError(
                        f"resume 'auto': {len(skipped)} checkpoint(s) under {self.root}, none valid (newest "
                        f"{newest.name}: {why}); repair or move them away, or resume 'none' to start fresh")
                if found is None:
                    log.info("no checkpoint under %s yet: starting fresh", self.root)
                return found

            return on_rank0(self.process_group, auto)
        path = Path(s).expanduser()

        def check() -> Path:
            v = self.verify_local(path)
            if not v.ok:
                raise CheckpointError(f"resume checkpoint {path}: {v.reason} "
                                      "(expected a valid step-N checkpoint directory, 'auto' or 'none')")
            return path

        return on_rank0(self.process_group, check)

    # -- save --

    def save(self, step: int, state: Mapping[str, Any]) -> Path:
        """Save `state` ({name: Stateful or plain dict}) as `root/step-{step:08d}`; returns that path.

        Collective when distributed. Writes into `step-N.tmp`, then rank 0 writes the manifest,
        fsyncs and renames; only then are checkpoints beyond keep_last deleted. An existing
        `step-N` (e.g. a corrupt one a resume skipped) is replaced only once the new one is complete.

        With `async_save`, the call waits for the previous save, takes the state dicts (references
        to the live tensors) and returns; a background thread copies the tensors into reused host
        buffers, then writes, publishes and prunes (a later `save` or `wait()` waits for it and
        raises its error). The copy overlaps the next forward/backward: the optimizers in `state`
        get a step pre-hook that waits until the copy is done, since their step is what changes
        the tensors in place (anything else that does must call `wait_staged()` first). The stall
        reported by `stats()` is the time in this call plus the time that hook waited."""
        if step < 0:
            raise ValueError(f"step={step}: must be >= 0")
        check_state_keys(state)
        t0 = time.perf_counter()
        self.wait()
        rank, _ = rank_and_world(self.process_group)
        flat = flat_state_for_save(state, rank)
        rec: dict[str, float] = {"step": float(step)}
        if self.async_save:
            # Non-tensor values are small; copied now, since their owners may change them in place.
            flat = {k: v if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in flat.items()}
            self._writer.hook_optimizers(state)
            self._writer.submit(flat, rec, lambda staged: self._write(step, staged, t0, rec))
            rec["stall_s"] = time.perf_counter() - t0
        else:
            self._write(step, flat, t0, rec)
            rec["stall_s"] = rec["total_s"]
        self._records.append(rec)
        return self.root / step_dir_name(step)

    def wait_staged(self) -> None:
        """Block until the async save in progress has copied the state (then it may change)."""
        self._writer.wait_staged()

    def wait(self) -> None:
        """Block until the save in progress (if any) is published; re-raise its error. Collective
        only in the sense that every rank waits for its own part."""
        self._writer.wait()

    def close(self) -> None:
        """Wait for the save in progress and stop the writer thread."""
        self._writer.close()

    def stats(self) -> list[dict[str, float]]:
        """Finished saves since the last call: step, stall_s (caller blocked), total_s (until
        published), bytes, incremental (0/1). A save still being written is reported later."""
        done = [r for r in self._records if "total_s" in r and "stall_s" in r]
        self._records = [r for r in self._records if r not in done]
        return done

    def _write(self, step: int, flat: dict[str, Any], t0: float, rec: dict[str, float]) -> None:
        """`_write_unchecked`, and when it fails (full disk, read-only, I/O error, ...) remove the
        temp directory and raise one CheckpointError line saying why and that the previous
        checkpoint is intact (nothing older is touched before a save is published)."""
        final = self.root / step_dir_name(step)
        tmp = unfinished_dir(final)
        try:
            self._write_unchecked(step, flat, t0, rec, final, tmp)
        except BaseException as e:
            # Diagnose before cleaning up: a full disk is still full now.
            cause = diagnose_write_failure(e, tmp) if not isinstance(e, CheckpointError | KeyboardInterrupt) \
                else None
            if rank_and_world(self.process_group)[0] == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, KeyboardInterrupt | SystemExit | CheckpointError):
                raise
            try:
                published = [p for p in self.list_checkpoints() if step_of(p) != step]
            except OSError:
                published = []
            previous = (f"the previous checkpoint {published[-1]} is intact (rerun with --checkpoint.resume auto to "
                        "continue from it)" if published
                        else "no earlier checkpoint exists (rerun with --overwrite to start over)")
            why = describe_os_error(cause, tmp) if cause is not None else first_line(e)
            raise CheckpointError(f"checkpoint save to {final} failed: {why}; the unfinished save was removed and "
                                  f"{previous}") from e

    def _write_unchecked(self, step: int, flat: dict[str, Any], t0: float, rec: dict[str, float],
                         final: Path, tmp: Path) -> None:
        """Encode, write with DCP, publish (rank 0), prune. Runs in the caller or the writer thread."""
        _, world = rank_and_world(self.process_group)

        def prepare() -> None:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)  # left by a save of this step that crashed
            tmp.mkdir()

        on_rank0(self.process_group, prepare)  # also a barrier: nobody writes before the directory is clean
        flat = encode_moments(flat, self.optimizer_states, self.quant_block)
        refs, digests = self._unchanged(flat, world)
        to_write = {k: v for k, v in flat.items() if k not in refs}
        save_flat(tmp, to_write, self.compression, self.process_group, is_distributed(self.process_group))
        barrier(self.process_group)  # every rank's files are written and fsynced (DCP's FileSystemWriter)
        extra: dict[str, Any] = {"compression": self.compression, "optimizer_states": self.optimizer_states,
                                 "quant_block": self.quant_block}
        if refs:
            assert self._base is not None
            extra.update(kind="incremental", base=self._base.path.name, refs=sorted(refs))

        def publish() -> int:
            manifest = write_manifest(tmp, step, world, extra)
            publish_dir(tmp, final)
            # The manifest's hashes were just computed from the files on disk; check names, sizes
            # and DCP's file references again after the rename, before anything is deleted.
            v = verify_checkpoint(final, deep=False)
            if not v.ok:
                raise CheckpointError(f"checkpoint {final}: failed its check right after saving: {v.reason}")
            with self._lock:
                self._verified.pop(str(final.resolve()), None)
            self._prune(step)
            return manifest["bytes"]

        rec["bytes"] = float(on_rank0(self.process_group, publish))
        rec["incremental"] = float(bool(refs))
        if self.full_every:
            if refs:
                self._since_full += 1
            else:
                self._base, self._since_full = LastFullCheckpoint(final, digests, world), 0
        rec["total_s"] = time.perf_counter() - t0

    def _unchanged(self, flat: Mapping[str, Any], world: int) -> tuple[set[str], dict[str, str]]:
        """(keys to take from the base instead of writing, this rank's digests). Empty when this
        save must be full: incremental off, no base yet, k-th save, world size changed, base gone."""
        if not self.full_every:
            return set(), {}
        # Optimizer state changes at every step (and frozen parameters have none): never hash it.
        digests = {k: tensor_digest(v) for k, v in flat.items()
                   if isinstance(v, torch.Tensor) and not k.startswith("optim.")}
        base = self._base
        if base is None or base.world != world or self._since_full + 1 >= self.full_every:
            return set(), digests
        if not on_rank0(self.process_group, lambda: verify_checkpoint(base.path, deep=False).ok):
            log.warning("base checkpoint %s is gone or invalid: writing a full checkpoint", base.path)
            return set(), digests
        same = {k for k, d in digests.items() if base.digests.get(k) == d}
        if is_distributed(self.process_group):
            everyone: list[Any] = [None] * world
            dist.all_gather_object(everyone, sorted(same), group=self.process_group)
            same = set.intersection(*(set(x) for x in everyone))
        return same, digests

    def _prune(self, new_step: int) -> None:
        """Keep the new checkpoint plus the newest keep_last-1 older ones that pass the size check;
        delete older ones and crash leftovers (.tmp/.old) older than the new step. Newer ones (from
        an earlier run that was resumed from further back) are kept, with a warning."""
        older: list[tuple[int, Path]] = []
        for p in self.root.iterdir():
            s, leftover = _step_and_leftover(p)
            if s < 0 or not p.is_dir():
                continue
            if s > new_step and not leftover:
                log.warning("checkpoint %s is newer than the one just saved (step %d): it is from an earlier "
                            "run and resume 'auto' would prefer it; delete it if it is stale", p, new_step)
            elif s < new_step:
                if leftover:
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    older.append((s, p))
        keep = self.keep_last - 1
        doomed = []
        for _, p in sorted(older, reverse=True):
            if keep > 0 and verify_checkpoint(p, deep=False).ok:
                keep -= 1
                continue
            doomed.append(p)
        # Never delete the base of a checkpoint that stays (incremental ones read tensors from it).
        needed = set()
        for p in self.root.iterdir():
            if p not in doomed and step_of(p) >= 0 and p.is_dir():
                manifest, _ = read_manifest(p)
                base = base_of(p, manifest) if manifest else None
                if base is not None:
                    needed.add(base.name)
        for p in doomed:
            if p.name in needed:
                log.info("keeping checkpoint %s beyond keep_last=%d: a kept incremental checkpoint is based on it",
                         p, self.keep_last)
                continue
            log.info("deleting checkpoint %s (keep_last=%d)", p, self.keep_last)
            shutil.rmtree(p, ignore_errors=True)
            with self._lock:
                self._verified.pop(str(p.resolve()), None)

    # -- load --

    def load(self, path: Path, state: Mapping[str, Any]) -> int:
        """Verify `path`, then load it into `state` (same keys as at save); returns its step.
        Collective when distributed; works without a process group in a single process."""
        path = Path(path)
        check_state_keys(state)

        def check() -> int:
            v = self.verify_local(path)
            if not v.ok:
                raise CheckpointError(f"checkpoint {path}: {v.reason}")
            assert v.step is not None
            return v.step

        self.wait()  # a save of this path may still be in flight
        step = on_rank0(self.process_group, check)
        rank, world = rank_and_world(self.process_group)
        load_state(path, state, rank, world, self.process_group, is_distributed(self.process_group))
        return step
