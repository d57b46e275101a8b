"""Range checks shared by the config sections: one failed check is one `ConfigError` line."""

from __future__ import annotations

from typing import Any

from lmforge.config.loader import ConfigError


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


def require_positive(section: str, obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        require(v > 0, f"{section}.{n}", v, "must be > 0")
