"""The evaluation's one user-facing exception."""

from __future__ import annotations


class EvalError(ValueError):
    """A source, data directory or option `lmforge eval` cannot work with (a data dir tokenized with
    another vocabulary, a bad --items); the message is one line: what, where, what is allowed."""
