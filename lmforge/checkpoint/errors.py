"""The one error the checkpoint code raises at its users, and how it turns other errors into it.

Its own module because every other checkpoint module raises it (the manifest check, DCP loads,
weights-only loads, the manager) and the CLI catches it: it sits below all of them, so none of
them has to import another just for the exception.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "first_line"]


class CheckpointError(Exception):
    """A checkpoint the user pointed at (or that a resume found) is missing, incomplete, corrupt or
    does not fit the state it is loaded into. The message is one line: which checkpoint, what."""


def first_line(e: BaseException) -> str:
    """`e` as one short line ("KeyError: ..."), for a CheckpointError message: DCP's errors span
    many lines (one block per rank) and would bury what went wrong."""
    text = str(e).strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return f"{e.__class__.__name__}: {line}"[:300]
