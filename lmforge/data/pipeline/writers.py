"""Shard writers: kept documents (jsonl, optionally zstd) and rejects (jsonl), temp-then-rename.

Why whole-shard atomic files: a shard's outputs appear under their final names only once the shard
is complete (`storage/atomic.py`), so a crash mid-shard leaves nothing that looks finished. Lines
are serialised the same way everywhere (sorted keys, UTF-8), so equal inputs give equal bytes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from lmforge.storage.atomic import atomic_open

__all__ = ["ZSTD_LEVEL", "dump_line", "jsonl_writer"]

ZSTD_LEVEL = 3


def dump_line(obj: dict[str, Any]) -> bytes:
    """One jsonl line; values JSON cannot hold (dates, decimals from parquet) as their str()."""
    return (json.dumps(obj, ensure_ascii=False, sort_keys=True, default=str) + "\n").encode("utf-8")


class _LineWriter:
    def __init__(self, f: IO[bytes]):
        self._f = f
        self.count = 0

    def write(self, obj: dict[str, Any]) -> None:
        self._f.write(dump_line(obj))
        self.count += 1


@contextmanager
def jsonl_writer(path: Path, compress: bool = False) -> Iterator[_LineWriter]:
    """Write jsonl records to `path` (a zstd frame when `compress`); the file appears under its
    name only when the block ends without an error."""
    with atomic_open(path, "wb") as f:
        if not compress:
            yield _LineWriter(f)
            return
        import zstandard

        with zstandard.ZstdCompressor(level=ZSTD_LEVEL).stream_writer(f, closefd=False) as z:
            yield _LineWriter(z)  # type: ignore[arg-type]
