"""The data path's one user-facing exception."""

from __future__ import annotations


class DataError(ValueError):
    """A user-caused data problem (missing package, bad corpus, unpacked dir, mismatched resume).

    The message is one complete line: what is wrong, where, and what is allowed or what to do.
    """
