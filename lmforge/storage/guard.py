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

__all__ = ["DestinationError", "check_destination", "check_no_overlap", "enclosing_checkpoint",
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
