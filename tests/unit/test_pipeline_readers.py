"""Pipeline readers: every bad input is a counted reject with its reason; every format reads alike."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from lmforge.data.pipeline.document import Document, Reject, content_hash
from lmforge.data.pipeline.readers import count_records, read_records, scan_jsonl

TEXTS = ["the first document", "second one, with ünïcödé", "third\nhas two lines"]


def _read(path: Path, fmt: str = "jsonl", max_chars: int = 1000, **kw) -> list[Document | Reject]:
    return list(read_records(path, fmt, path.name, "text", max_chars, **kw))


def test_every_reject_reason_is_counted_with_its_line(tmp_path):
    lines = [
        b'{"text": "good one", "lang": "en"}',
        b'{"text": "broken',
        b'{"text": "bad \xff byte"}',
        b'{"text": "   "}',
        b'{"text": "' + b"x" * 50 + b'"}',
        b'{"body": "no text field"}',
        b'{"text": 42}',
        b"[1, 2]",
        b"",
        b'{"text": "last good"}',
    ]
    p = tmp_path / "in.jsonl"
    p.write_bytes(b"\n".join(lines) + b"\n")
    items = _read(p, max_chars=20)
    assert len(items) == len(lines)  # nothing silently dropped
    got = [(i.id, i.reason) if isinstance(i, Reject) else (i.id, "ok") for i in items]
    assert got == [("in.jsonl:1", "ok"), ("in.jsonl:2", "malformed_json"), ("in.jsonl:3", "invalid_utf8"),
                   ("in.jsonl:4", "empty_document"), ("in.jsonl:5", "oversized_document"),
                   ("in.jsonl:6", "missing_text_field"), ("in.jsonl:7", "non_string_text_field"),
                   ("in.jsonl:8", "malformed_json"), ("in.jsonl:9", "empty_document"), ("in.jsonl:10", "ok")]
    assert items[0].metadata == {"lang": "en"} and items[0].offset == 1 and items[0].text == "good one"
    assert all(i.stage == "read" and i.source == "in.jsonl" for i in items if isinstance(i, Reject))
    assert count_records(p, "jsonl") == 10


def test_oversized_line_is_skipped_without_reading_it_whole(tmp_path):
    p = tmp_path / "big.jsonl"
    p.write_text(json.dumps({"text": "y" * 100_000}) + "\n" + json.dumps({"text": "after"}) + "\n")
    items = _read(p, max_chars=100)
    assert [type(i).__name__ for i in items] == ["Reject", "Document"]
    assert items[0].reason == "oversized_document" and items[1].text == "after" and items[1].offset == 2


def _write_all_formats(tmp_path: Path) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    body = "".join(json.dumps({"text": t}) + "\n" for t in TEXTS).encode()
    plain = tmp_path / "c.jsonl"
    plain.write_bytes(body)
    gz = tmp_path / "c.jsonl.gz"
    gz.write_bytes(gzip.compress(body))
    zst = tmp_path / "c.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(body))
    pq_path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": TEXTS}), pq_path, row_group_size=2)
    return {"jsonl": plain, "gz": gz, "zst": zst, "parquet": pq_path}


def test_gz_zst_parquet_and_text_dir_read_identically(tmp_path):
    files = _write_all_formats(tmp_path)
    texts = {}
    for name, path in files.items():
        fmt = "parquet" if name == "parquet" else "jsonl"
        items = _read(path, fmt)
        assert all(isinstance(i, Document) for i in items), name
        texts[name] = [i.text for i in items]
    tdir = tmp_path / "docs"
    tdir.mkdir()
    for k, t in enumerate(TEXTS):
        (tdir / f"{k}.txt").write_text(t, encoding="utf-8")
    texts["text"] = [i.text for f in sorted(tdir.iterdir()) for i in read_records(f, "text", f.name, "text", 1000)]
    assert all(v == TEXTS for v in texts.values()), texts
    assert count_records(files["parquet"], "parquet") == 3 and count_records(files["zst"], "jsonl") == 3


def test_record_ranges_partition_a_file(tmp_path):
    files = _write_all_formats(tmp_path)
    for fmt, path in (("jsonl", files["zst"]), ("parquet", files["parquet"])):
        parts = [_read(path, fmt, start=s, stop=e) for s, e in ((0, 1), (1, 3))]
        assert [d.text for part in parts for d in part] == TEXTS, fmt
        assert [d.offset for d in parts[1]] == ([2, 3] if fmt == "jsonl" else [1, 2])


def test_parquet_rejects_missing_column_null_and_bad_bytes(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "b.parquet"
    pq.write_table(pa.table({"text": pa.array([b"ok text", b"\xff\xfe", None, b""], pa.binary())}), p)
    items = _read(p, "parquet")
    assert [i.reason if isinstance(i, Reject) else i.text for i in items] == [
        "ok text", "invalid_utf8", "missing_text_field", "empty_document"]
    q = tmp_path / "n.parquet"
    pq.write_table(pa.table({"body": ["a", "b"]}), q)
    assert [i.reason for i in _read(q, "parquet")] == ["missing_text_field"] * 2


def test_text_file_rejects(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    big = tmp_path / "big.txt"
    big.write_text("z" * 500)
    reasons = [i.reason for f in (bad, empty, big) for i in read_records(f, "text", f.name, "text", 100)]
    assert reasons == ["invalid_utf8", "empty_document", "oversized_document"]


@pytest.mark.parametrize("a,b,same", [("Caf\u00e9  au\nlait ", "Cafe\u0301 au lait", True), ("a b", "a c", False)])
def test_content_hash_normalises(a, b, same):
    assert (content_hash(a) == content_hash(b)) is same


@pytest.mark.parametrize("suffix", ["", ".gz", ".zst"])
def test_scan_offsets_start_shards_at_their_line(tmp_path, suffix):
    import zstandard

    body = "".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(10)).encode()
    raw = {"": body, ".gz": gzip.compress(body), ".zst": zstandard.ZstdCompressor().compress(body)}[suffix]
    p = tmp_path / f"c.jsonl{suffix}"
    p.write_bytes(raw)
    n, offsets = scan_jsonl(p, 3)
    assert n == 10 and offsets == [body.index(f'{{"text": "doc {i}"}}'.encode()) for i in (0, 3, 6, 9)]
    got = [d.text for k, s in enumerate(range(0, n, 3))
           for d in read_records(p, "jsonl", "c", "text", 100, s, min(s + 3, n), offsets[k])]
    assert got == [f"doc {i}" for i in range(10)]
    assert [d.offset for d in read_records(p, "jsonl", "c", "text", 100, 6, 9, offsets[2])] == [7, 8, 9]
