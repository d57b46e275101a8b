"""The watermark's secret key: read from a file, kept as bytes, never shown.

Why a file and a wrapper: a key on the command line lands in shell history and `ps`; a plain
`bytes` attribute lands in reprs, tracebacks and logs. `WatermarkKey` derives the 32-byte hashing
key (sha256 of the file's stripped contents, so any secret string works) and prints as
`WatermarkKey(<secret>)`. `write_new_key` makes a fresh random key file readable by its owner only.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

from lmforge.safety.errors import SafetyError
from lmforge.storage.atomic import atomic_open

MIN_KEY_BYTES = 16


class WatermarkKey:
    """A secret hashing key; `material` is 32 bytes derived from the secret, never printed."""

    __slots__ = ("_material",)

    def __init__(self, secret: bytes):
        if len(secret) < MIN_KEY_BYTES:
            raise SafetyError(f"watermark key: {len(secret)} bytes; need at least {MIN_KEY_BYTES} "
                              "(make one with `lmforge watermark keygen FILE`)")
        self._material = hashlib.sha256(b"lmforge-watermark-key\0" + secret).digest()

    @property
    def material(self) -> bytes:
        return self._material

    def __repr__(self) -> str:
        return "WatermarkKey(<secret>)"

    __str__ = __repr__


def read_key_file(path: Path | str) -> WatermarkKey:
    """The key in `path` (its contents, surrounding whitespace stripped); errors name the path only."""
    path = Path(path)
    if not path.is_file():
        raise SafetyError(f"key file {path}: no such file (make one with `lmforge watermark keygen {path}`)")
    try:
        secret = path.read_bytes().strip()
    except OSError as e:
        raise SafetyError(f"key file {path}: cannot read ({e.strerror})") from None
    if len(secret) < MIN_KEY_BYTES:
        raise SafetyError(f"key file {path}: {len(secret)} bytes; need at least {MIN_KEY_BYTES} "
                          f"(make one with `lmforge watermark keygen FILE`)")
    return WatermarkKey(secret)


def write_new_key(path: Path | str) -> None:
    """A new random key (32 bytes, hex) in `path`, mode 0600, written temp-then-rename."""
    path = Path(path)
    with atomic_open(path, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(secrets.token_hex(32) + "\n")
