"""What `lmforge train` checks before it writes into a run directory (and into the data directory).

A run directory that already holds a run (checkpoints, metrics, config) is continued only when
asked (`--checkpoint.resume auto|PATH`) and started over only with `--overwrite`, which moves the
earlier run aside to `<run>.old-<time>` instead of mixing two runs' files; nothing is deleted.
One exception: a run that stopped before its first step (a resume checkpoint found invalid, a data
error) left only what every run writes at its start (STARTUP_FILES). That holds no progress, and the
same command, corrected, starts over in place, saying so, instead of being refused.

What is not a run is never written into unasked (`check_output_dir`, before even the lock file):
a checkpoint directory never, and a non-empty directory without a run (someone's files, a Hugging
Face directory, whose config.json and tokenizer.json are not a run's) only with `--overwrite`,
which moves its contents aside as it does a run's.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from lmforge.storage.guard import DestinationError, check_no_overlap, overlap
from lmforge.storage.layout import RunDir, holds_checkpoint, step_of
from lmforge.storage.lock import LOCK_NAME
from lmforge.storage.model_dir import is_run_dir

__all__ = ["RUN_FILES", "STARTUP_FILES", "check_data_dir", "check_output_dir", "earlier_run", "move_run_aside",
           "prepare_run_dir"]

RUN_FILES = RunDir.RUN_FILES  # what a run writes besides its checkpoints
STARTUP_FILES = (RunDir.CONFIG, RunDir.TOKENIZER)  # what a run writes before its first step
# What `data prepare` writes into data.dir (lmforge.data.pack / corpus / tokenizer).
DATA_FILES = ("corpus.jsonl", "corpus.meta.json", "tokenizer.json", "tokenizer.meta.json", "manifest.json",
              "train.bin", "val.bin", "train.idx.npy", "val.idx.npy", "train.docs.npy", "val.docs.npy")
_DATA_MARKERS = ("manifest.json", "corpus.meta.json")


def earlier_run(run_dir: Path, ckpt_folder: str) -> list[str]:
    """Names in `run_dir` that an earlier training run left (empty: a new or empty directory)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [n for n in RUN_FILES if (run_dir / n).exists()]
    ckpt = run_dir / ckpt_folder
    if ckpt.is_dir() and any(ckpt.iterdir()):
        found.insert(0, f"{ckpt_folder}/")
    found += sorted(p.name for p in run_dir.glob("events.out.tfevents.*"))
    return found


def _not_of_a_run(run_dir: Path, ckpt_folder: str) -> list[str]:
    """Names in `run_dir` no training run writes (sorted)."""
    ours = {LOCK_NAME, *RUN_FILES, ckpt_folder, RunDir.TENSORBOARD}
    return sorted(p.name for p in run_dir.iterdir()
                  if p.name not in ours and not p.name.startswith("events.out.tfevents."))


def check_output_dir(run_dir: Path, ckpt_folder: str, overwrite: bool, data_dir: Path, restarted: bool) -> None:
    """Refuse, before anything is written there (the lock file included), a `train.output_dir` that
    is the data directory or a checkpoint directory, or that is not empty and holds no lmforge run
    (unless `overwrite`). `restarted`: torchrun restarted this job's workers (its own run)."""
    run_dir = Path(run_dir)
    if overlap(run_dir, data_dir) == "is the same path as":
        raise DestinationError(f"train.output_dir {run_dir} is the data directory (data.dir): the run's files would "
                               "mix with the dataset's; choose another --train.output_dir")
    if restarted:
        return
    if holds_checkpoint(run_dir) or step_of(run_dir) >= 0:
        raise DestinationError(f"train.output_dir {run_dir} is a checkpoint directory, and nothing is ever written "
                               "inside one (refused even with --overwrite); choose another --train.output_dir")
    if overwrite or not run_dir.is_dir():
        return
    found = earlier_run(run_dir, ckpt_folder)
    if found and not set(found) <= set(STARTUP_FILES):
        return  # a run: prepare_run_dir's rules (resume, refuse, --overwrite)
    others = _not_of_a_run(run_dir, ckpt_folder)
    if RunDir.CONFIG in found and not is_run_dir(run_dir):
        others.insert(0, f"{RunDir.CONFIG} (not a run's)")
    if others:
        raise DestinationError(f"train.output_dir {run_dir} is not empty ({', '.join(others[:3])}) and holds no "
                               "lmforge run; choose a new or empty --train.output_dir, or pass --overwrite (moves "
                               f"what is there to {run_dir.name}.old-<time>)")


def move_run_aside(run_dir: Path) -> Path:
    """Move everything in `run_dir` but the lock file to a new sibling `<run>.old-<time>`; returns it."""
    run_dir = Path(run_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    n = 1
    while dest.exists():
        n += 1
        dest = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{n}")
    dest.mkdir()
    for entry in sorted(run_dir.iterdir()):
        if entry.name != LOCK_NAME:
            os.rename(entry, dest / entry.name)
    return dest


def prepare_run_dir(run_dir: Path, ckpt_folder: str, resume: str, overwrite: bool,
                    data_dir: Path, restarted: bool) -> str:
    """Apply the run-directory rules (the caller holds the run's lock). Returns a line to print
    when the earlier run was moved aside, else ''. `restarted`: torchrun restarted the workers of
    this job (its own run: continue, never refuse)."""
    run_dir = Path(run_dir)
    if restarted:
        return ""
    mode = resume.strip().lower()
    if overwrite:
        check_no_overlap(run_dir, {"data directory (data.dir)": data_dir}, "train.output_dir")
        if mode == "auto":
            raise DestinationError("--overwrite starts the run over and --checkpoint.resume auto continues it: "
                                   "pass one of them")
        if mode != "none" and overlap(resume, run_dir) in ("is the same path as", "is inside"):
            raise DestinationError(f"--checkpoint.resume {resume} is inside {run_dir}, which --overwrite would move "
                                   "aside; resume from a checkpoint outside it, or drop --overwrite")
    found = earlier_run(run_dir, ckpt_folder)
    others = _not_of_a_run(run_dir, ckpt_folder) if overwrite and run_dir.is_dir() else []
    if not (found or others) or (mode != "none" and not overwrite):
        return ""
    if not overwrite and set(found) <= set(STARTUP_FILES):
        return (f"train.output_dir {run_dir}: the run there stopped before its first step (it left only "
                f"{', '.join(found)}): starting over in place")
    if not overwrite:
        raise DestinationError(
            f"train.output_dir {run_dir} already holds a run ({', '.join(found[:4])}); continue it with "
            f"--checkpoint.resume auto, start over with --overwrite (moves it to {run_dir.name}.old-<time>), or "
            "choose another --train.output_dir")
    dest = move_run_aside(run_dir)
    was_run = any(f not in STARTUP_FILES for f in found) or is_run_dir(dest)
    return f"--overwrite: moved the earlier {'run' if was_run else 'contents'} in {run_dir} to {dest}"


def check_data_dir(data_dir: Path, corpus: str, overwrite: bool) -> None:
    """`data prepare` (and `train`, which prepares data too) writes DATA_FILES into `data_dir`:
    refuse a corpus file that is one of them (it would be replaced by its own rewrite) and a
    non-empty directory that holds no lmforge dataset (someone else's files) unless `overwrite`."""
    data_dir = Path(data_dir)
    if corpus != "default":
        for name in DATA_FILES:
            if overlap(corpus, data_dir / name) in ("is the same path as", "contains"):
                raise DestinationError(f"data.corpus {corpus} is where data prepare writes its own {name} in "
                                       f"data.dir {data_dir} (refused even with --overwrite); move the corpus or "
                                       "choose another --data.dir")
    if overwrite or not data_dir.is_dir() or any((data_dir / m).is_file() for m in _DATA_MARKERS):
        return
    others = sorted(p.name for p in data_dir.iterdir() if corpus == "default" or overlap(p, corpus) != "is the same path as")
    if others:
        raise DestinationError(f"data.dir {data_dir} is not empty ({', '.join(others[:3])}) and holds no lmforge "
                               "dataset; choose a new or empty --data.dir, or pass --overwrite to write into it")
