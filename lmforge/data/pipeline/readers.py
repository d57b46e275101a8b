"""Streaming readers: input files -> `Document`s, and every input that cannot be one -> `Reject`.

Why generators with record ranges: a corpus is far larger than memory, and a shard is a
deterministic range of records of one file, so each reader streams a file once, yields only the
records in [start, stop), and never holds more than one record. Why rejects instead of errors:
one broken line in a billion must neither stop the run nor vanish; it is counted and written with
its reason (`REJECT_REASONS`).
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from lmforge.data.pipeline.document import Document, Reject

__all__ = ["REJECT_REASONS", "count_records", "scan_jsonl", "input_files", "open_binary", "read_records", "source_name"]

REJECT_REASONS = ("malformed_json", "invalid_utf8", "missing_text_field", "non_string_text_field",
                  "empty_document", "oversized_document")

Item = Document | Reject
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".json.gz", ".json.zst")


def open_binary(path: Path) -> IO[bytes]:
    """A binary stream of the decompressed bytes of `path` (.gz, .zst or plain), read lazily."""
    name = path.name
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        import zstandard

        raw = open(path, "rb")  # noqa: SIM115 (closed with the reader below)
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
        return io.BufferedReader(reader, 1 << 20)
    return open(path, "rb")


def input_files(path: Path, fmt: str) -> list[Path]:
    """The files of one input, sorted: the file itself, or the matching files under a directory."""
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if fmt == "jsonl":
        return [p for p in files if p.name.endswith(JSONL_SUFFIXES)]
    if fmt == "parquet":
        return [p for p in files if p.name.endswith(".parquet")]
    return files


def source_name(path: Path, root: Path) -> str:
    """The name ids start with: the path relative to the input's root directory, or the file name."""
    return path.name if root.is_file() else f"{root.name}/{path.relative_to(root).as_posix()}"


def count_records(path: Path, fmt: str) -> int:
    """Number of records (jsonl lines, parquet rows; 1 for a text file), for planning shards."""
    if fmt == "text":
        return 1
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    return scan_jsonl(path, 0)[0]


def scan_jsonl(path: Path, every: int) -> tuple[int, list[int]]:
    """(number of lines, byte offsets in the decompressed stream of lines 0, every, 2 * every, ...):
    one pass at planning time, so a shard starts reading at its first line instead of re-reading
    the file from the top (which would make many shards of one file quadratic)."""
    n, base, offsets, last = 0, 0, [0], b"\n"
    with open_binary(path) as f:
        while block := f.read(1 << 20):
            c = block.count(b"\n")
            idx, seen = -1, 0
            while every and (need := len(offsets) * every - n) <= c:
                while seen < need:
                    idx = block.index(b"\n", idx + 1)
                    seen += 1
                offsets.append(base + idx + 1)
            n += c
            base += len(block)
            last = block[-1:]
    return n + (last != b"\n"), offsets


def _skip_bytes(f: IO[bytes], n: int) -> None:
    """Move a stream `n` bytes forward: a seek where the stream can, else read and discard."""
    if n and f.seekable():
        f.seek(n)
        return
    while n > 0 and (block := f.read(min(n, 1 << 20))):
        n -= len(block)


def _check_text(text: Any, field: str, doc_id: str, source: str, offset: int, max_chars: int,
                metadata: dict[str, Any]) -> Item:
    if text is None:
        return Reject(doc_id, source, offset, "read", "missing_text_field", f"no {field!r} field")
    if not isinstance(text, str):
        return Reject(doc_id, source, offset, "read", "non_string_text_field",
                      f"{field!r} is a {type(text).__name__}, not a string")
    if not text.strip():
        return Reject(doc_id, source, offset, "read", "empty_document", "no non-space characters")
    if len(text) > max_chars:
        return Reject(doc_id, source, offset, "read", "oversized_document", f"{len(text)} chars > max_chars {max_chars}")
    return Document(doc_id, text, source, offset, metadata)


def _read_line(f: IO[bytes], limit: int) -> tuple[bytes, bool]:
    """One line of at most `limit` bytes; a longer line is skipped to its end (never held whole):
    returns (line, too_long)."""
    line = f.readline(limit)
    if len(line) < limit or line.endswith(b"\n"):
        return line, False
    while (more := f.readline(1 << 20)) and not more.endswith(b"\n"):
        pass
    return b"", True


def read_jsonl(path: Path, source: str, text_field: str, max_chars: int, start: int = 0,
               stop: int | None = None, byte_offset: int | None = None) -> Iterator[Item]:
    """Records [start, stop) (0-based line indices) of a jsonl file; ids `<source>:<line>` (1-based).
    `byte_offset`: where line `start` begins (from `scan_jsonl`); without it lines are skipped."""
    limit = 4 * max_chars + 4096  # UTF-8: at most 4 bytes a char, plus the JSON around the text
    with open_binary(path) as f:
        index = 0
        if byte_offset is not None:
            _skip_bytes(f, byte_offset)
            index = start
        while stop is None or index < stop:
            raw, too_long = _read_line(f, limit)
            if not raw and not too_long:
                break
            index += 1
            if index - 1 < start:
                continue
            line_no = index
            doc_id = f"{source}:{line_no}"
            if too_long:
                yield Reject(doc_id, source, line_no, "read", "oversized_document", f"line longer than {limit} bytes")
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield Reject(doc_id, source, line_no, "read", "invalid_utf8", f"byte 0x{raw[e.start]:02x} at {e.start}")
                continue
            if not line.strip():
                yield Reject(doc_id, source, line_no, "read", "empty_document", "blank line")
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                yield Reject(doc_id, source, line_no, "read", "malformed_json", str(e).split("\n")[0][:200])
                continue
            if not isinstance(obj, dict):
                yield Reject(doc_id, source, line_no, "read", "malformed_json", f"a JSON {type(obj).__name__}, not an object")
                continue
            text = obj.pop(text_field, None)
            yield _check_text(text, text_field, doc_id, source, line_no, max_chars, obj)


def read_parquet(path: Path, source: str, text_field: str, max_chars: int, start: int = 0,
                 stop: int | None = None) -> Iterator[Item]:
    """Rows [start, stop) of a parquet file, read record batch by record batch; ids `<source>:<row>`."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    has_field = text_field in pf.schema_arrow.names
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        if stop is not None and row >= stop:
            break
        n = batch.num_rows
        if row + n <= start:
            row += n
            continue
        rows = batch.to_pylist()
        for i, rec in enumerate(rows):
            r = row + i
            if r < start or (stop is not None and r >= stop):
                continue
            doc_id = f"{source}:{r}"
            text = rec.pop(text_field, None) if has_field else None
            if isinstance(text, bytes):
                try:
                    text = text.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield Reject(doc_id, source, r, "read", "invalid_utf8", f"byte 0x{text[e.start]:02x} at {e.start}")
                    continue
            yield _check_text(text, text_field, doc_id, source, r, max_chars, rec)
        row += n


def read_text_file(path: Path, source: str, max_chars: int) -> Iterator[Item]:
    """One text file as one document, id `<source>`; a file too large is refused from its size alone."""
    size = path.stat().st_size
    if size > 4 * max_chars:
        yield Reject(source, source, 0, "read", "oversized_document", f"{size} bytes > 4 * max_chars {max_chars}")
        return
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        yield Reject(source, source, 0, "read", "invalid_utf8", f"byte 0x{raw[e.start]:02x} at {e.start}")
        return
    yield _check_text(text, "text", source, source, 0, max_chars, {})


def read_records(path: Path, fmt: str, source: str, text_field: str, max_chars: int, start: int = 0,
                 stop: int | None = None, byte_offset: int | None = None) -> Iterator[Item]:
    """Dispatch on the input format."""
    if fmt == "parquet":
        return read_parquet(path, source, text_field, max_chars, start, stop)
    if fmt == "text":
        return read_text_file(path, source, max_chars)
    return read_jsonl(path, source, text_field, max_chars, start, stop, byte_offset)
