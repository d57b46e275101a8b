"""The one error type of the safety package: a bad key file, filter config or detector argument."""

from __future__ import annotations


class SafetyError(ValueError):
    """A safety input the user can fix (key file, filter TOML, thresholds); the message is one line
    and never contains a secret key."""
