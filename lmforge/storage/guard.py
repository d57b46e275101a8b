"""No-clobber rules shared by every command that writes.

1. An existing non-empty destination is refused unless the user passed `--overwrite`.
2. A destination that overlaps a source (the same path, or one inside the other, symlinks
   resolved) is refused always, `--overwrite` or not: writing it would destroy what is being read.
3. Nothing is written inside a checkpoint directory (its manifest lists every file; a stray file,
   or a replaced one, corrupts it).
4. A directory another lmforge job holds the lock of is never replaced.

Each refusal is a `DestinationError` whose message is one line: which path, why, what to do.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.storage.layout import holds_checkpoint, step_of

__all__ = ["DestinationError", "check_destination", "check_no_overlap", "check_output_file", "enclosing_checkpoint",
           "overlap", "resolved"]


class DestinationError(Exception):
    """A destination the no-clobber rules refuse; the message is one complete line."""


def resolved(path: Path | str) -> Path:
    """Absolute, `~` expanded, symlinks resolved (as far as the path exists)."""
    return Path(path).expanduser().resolve(strict=False)


def overlap(a: Path | str, b: Path | str) -> str:
    """'' when `a` and `b` are disjoint; else how `a` relates to `b`: 'is the same path as', 'is inside'
    or 'contains'."""
    ra, rb = resolved(a), resolved(b)
    if ra == rb:
        return "is the same path as"
    if rb in ra.parents:
        return "is inside"
    if ra in rb.parents:
        return "contains"
    return ""


def check_no_overlap(dest: Path | str, sources: dict[str, Path | str | None], flag: str = "output") -> None:
    """Refuse (always, even with --overwrite) a destination overlapping any named source."""
    for label, src in sources.items():
        if src is None:
            continue
        how = overlap(dest, src)
        if how:
            raise DestinationError(f"{flag} {dest} {how} the {label} {src}: writing there would destroy what is "
                                   f"being read (refused even with --overwrite); choose a path outside it")


# What lmforge reads from a run, model, checkpoint or data directory: never replaced by a result
# file written into one (a result of an earlier command, such as eval.json, may be).
READ_IN_DIRECTORIES = frozenset({
    "config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
    "run_config.json", "quantization.json", "pruning.json", "stats.json", "manifest.json", "corpus.meta.json",
    "tokenizer.meta.json", "model.safetensors.index.json", "lmforge-checkpoint.json", "onnx_export.json",
    "plan.json", "lmforge.lock"})
READ_SUFFIXES = frozenset({".safetensors", ".distcp", ".bin", ".npy", ".jsonl", ".zst", ".gz", ".parquet", ".pt",
                           ".onnx", ".toml"})


def check_output_file(dest: Path | str, overwrite: bool, sources: dict[str, Path | str | None],
                      flag: str = "--out") -> None:
    """A file a command writes beside what it reads (a report, a JSON result, a recipe): refused
    always when it is a file being read, or an existing file inside a directory being read that
    lmforge reads there (`READ_IN_DIRECTORIES`, `READ_SUFFIXES`); a new file there is fine (`eval
    RUN --out RUN/eval.json`). Then `check_destination`'s rules."""
    for label, src in sources.items():
        if src is None or str(src) == "-":
            continue
        how = overlap(dest, src)
        read_there = Path(dest).name in READ_IN_DIRECTORIES or Path(dest).suffix in READ_SUFFIXES
        if how == "is the same path as" or (how == "is inside" and Path(dest).exists() and read_there):
            raise DestinationError(f"{flag} {dest} {'is' if how == 'is the same path as' else 'is a file of'} the "
                                   f"{label} {src}: writing there would destroy what is being read (refused even "
                                   "with --overwrite); choose another path")
    check_destination(dest, overwrite, kind="file", flag=flag)


def enclosing_checkpoint(path: Path | str) -> Path | None:
    """The checkpoint directory `path` is (or lies inside), or None."""
    p = resolved(path)
    for d in [p, *p.parents]:
        if d.is_dir() and (holds_checkpoint(d) or step_of(d) >= 0):
            return d
    return None


def _nonempty(path: Path) -> bool:
    return path.is_symlink() or path.is_file() or (path.is_dir() and any(path.iterdir()))


def check_destination(dest: Path | str, overwrite: bool, *, kind: str = "directory",
                      sources: dict[str, Path | str | None] | None = None, flag: str = "output") -> None:
    """All the rules for a destination `dest` (a "directory" or a "file"):

    - overlap with any of `sources` -> refused always;
    - inside a checkpoint -> refused always;
    - a file where a directory is wanted, or the reverse -> refused always;
    - held by a running lmforge job (its lock) -> refused always;
    - exists and not empty -> refused unless `overwrite`."""
    dest = Path(dest)
    check_no_overlap(dest, sources or {}, flag)
    ckpt = enclosing_checkpoint(dest if dest.exists() else dest.parent)
    if ckpt is not None:
        raise DestinationError(f"{flag} {dest} is inside the checkpoint {ckpt}: writing there would corrupt it "
                               f"(refused even with --overwrite); choose a path outside it")
    if kind == "file" and dest.is_dir():
        raise DestinationError(f"{flag} {dest} is a directory; give the path of a file to write, "
                               f"e.g. {dest / 'model.pt'}")
    if kind == "directory" and dest.exists() and not dest.is_dir():
        raise DestinationError(f"{flag} {dest} is a file; give the path of a directory to create")
    if dest.is_dir():
        from lmforge.storage.lock import holder_if_locked

        holder = holder_if_locked(dest)
        if holder:
            raise DestinationError(f"{flag} {dest} is in use by a running lmforge job ({holder}); "
                                   f"refused even with --overwrite")
    if _nonempty(dest) and not overwrite:
        raise DestinationError(f"{flag} {dest} already exists and is not empty; choose a new path, or pass "
                               f"--overwrite to replace it")
