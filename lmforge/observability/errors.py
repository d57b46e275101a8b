"""The one exception type of lmforge.observability: user-fixable problems, one line each."""

from __future__ import annotations


class ObservabilityError(Exception):
    """A metrics, benchmark or plot input a user can fix (bad dtype, missing metrics file...)."""
