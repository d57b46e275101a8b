"""Where packed tokens came from: a token range of a split -> the packed documents it touches ->
their corpus lines -> (when the corpus is a pipeline's output) the source file, its line or row,
the content hash and every step's verdict.

Why it can be exact: the pack stores, per split, the token offset where each document starts
(`<split>.idx.npy`) and the row each document was in the corpus it packed (`<split>.docs.npy`):
the default pipeline's `pipeline/output.jsonl` for the default corpus (its record keeps its
`corpus.jsonl` line, the corpus document's id, source and locator, and every step's verdict),
else `corpus.jsonl` (which, for a corpus that was a pipeline's output, keeps that record's file
and line). Which one the manifest's fingerprint says (`files.packed_corpus`); nothing is guessed
from the text. `lmforge data trace DATA_DIR OFFSET [--length N] [--split train]`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.data.errors import DataError
from lmforge.data.files import packed_corpus, read_json
from lmforge.data.pipeline.document import content_hash

__all__ = ["TracedDocument", "trace_tokens", "format_trace"]


@dataclass
class TracedDocument:
    """One packed document overlapping the asked token range."""

    split: str
    index: int  # the document's position in the split
    tokens: tuple[int, int]  # its [start, end) token offsets in the split (end excludes the end-of-text id)
    corpus_line: int  # 1-based line of corpus.jsonl (0: the pipeline record names none)
    id: str
    source: str
    locator: str
    content_hash: str
    text_start: str
    pipeline: dict[str, Any] = field(default_factory=dict)  # source, offset, provenance of the pipeline record


def _lines(path: Path, numbers: set[int]) -> dict[int, str]:
    """Lines `numbers` (1-based) of a text file, in ONE streaming pass that stops after the last
    (corpora are large, and a range may touch thousands of documents: a pass per document read
    the corpus once each)."""
    found: dict[int, str] = {}
    if numbers:
        last = max(numbers)
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if n in numbers:
                    found[n] = line
                if n == last:
                    break
    if len(found) < len(numbers):
        raise DataError(f"{path} has fewer than {max(numbers)} lines; the pack is older than this corpus: rerun "
                        "`lmforge data prepare`")
    return found


def _pipeline_records(data_dir: Path, locators: list[str]) -> list[dict[str, Any]]:
    """The pipeline output record behind each corpus document ({} where there is none), when the
    corpus was built from one (`data.corpus` = a pipeline's output.jsonl; a locator is
    "output.jsonl:<line>")."""
    meta = read_json(data_dir / "corpus.meta.json") or {}
    spec = meta.get("inputs", {}).get("spec")
    if not spec or spec == "default" or not Path(spec).is_file():
        return [{} for _ in locators]
    wanted = {}
    for i, locator in enumerate(locators):
        name, _, line = locator.rpartition(":")
        if line.isdigit() and Path(spec).name == name:
            wanted[i] = int(line)
    records = _lines(Path(spec), set(wanted.values()))
    out: list[dict[str, Any]] = [{} for _ in locators]
    for i, line in wanted.items():
        obj = json.loads(records[line])
        if isinstance(obj, dict) and "provenance" in obj:
            out[i] = _pipeline_fields(obj, spec, line)
    return out


def _pipeline_fields(obj: dict[str, Any], file: str, line: int) -> dict[str, Any]:
    """What the trace shows of a pipeline output record (line `line` of `file`)."""
    return {"file": file, "line": line, "source": obj.get("source"), "offset": obj.get("offset"),
            "id": obj.get("id"), "metadata": obj.get("metadata") or {}, "provenance": obj["provenance"]}


def trace_tokens(data_dir: Path | str, offset: int, length: int = 1, split: str = "train") -> list[TracedDocument]:
    """The documents that tokens [offset, offset + length) of `split` belong to, in order."""
    from lmforge.data.loader import TokenDataset  # the same manifest checks as training

    data_dir = Path(data_dir)
    ds = TokenDataset(data_dir, split)
    if not 0 <= offset < ds.n_tokens or length < 1:
        raise DataError(f"token range [{offset}, {offset + length}) of {split}: offset must be in "
                        f"[0, {ds.n_tokens}) and length >= 1")
    packed = packed_corpus(data_dir, read_json(data_dir / "manifest.json") or {})
    if packed is None:
        raise DataError(f"{data_dir}: neither pipeline/output.jsonl nor corpus.jsonl has the content this pack "
                        "was made from (changed since); rerun `lmforge data prepare`")
    starts = np.load(data_dir / f"{split}.idx.npy", mmap_mode="r")
    rows = np.load(data_dir / f"{split}.docs.npy", mmap_mode="r")
    end = min(offset + length, ds.n_tokens)
    first = int(np.searchsorted(starts, offset, side="right")) - 1
    last = int(np.searchsorted(starts, end - 1, side="right")) - 1
    docs = range(first, last + 1)
    lines = [int(rows[i]) + 1 for i in docs]
    records = _lines(packed, set(lines))
    out = []
    for i, line in zip(docs, lines):
        rec = json.loads(records[line])
        tokens = (int(starts[i]), int(starts[i + 1]) - 1)
        if "provenance" in rec:  # a pipeline record: what was packed, and the corpus line it was read from
            pipeline = _pipeline_fields(rec, str(packed), line)
            meta = pipeline["metadata"]
            out.append(TracedDocument(split, i, tokens, int(rec.get("offset") or 0), str(meta.get("id", rec["id"])),
                                      str(meta.get("source", rec.get("source"))), str(meta.get("locator", "")),
                                      content_hash(rec["text"]), rec["text"][:80], pipeline))
        else:
            out.append(TracedDocument(split, i, tokens, line, rec["id"], rec["source"], rec["locator"],
                                      content_hash(rec["text"]), rec["text"][:80]))
    plain = [d for d in out if not d.pipeline]  # corpus documents: their pipeline records, one pass
    for d, record in zip(plain, _pipeline_records(data_dir, [d.locator for d in plain])):
        d.pipeline = record
    return out


def format_trace(docs: list[TracedDocument]) -> list[str]:
    """Human-readable lines, one block per document."""
    lines = []
    for d in docs:
        lines.append(f"{d.split} document {d.index}: tokens [{d.tokens[0]}, {d.tokens[1]}) <- corpus.jsonl line "
                     f"{d.corpus_line}: id {d.id}, source {d.source}, at {d.locator}, sha256 {d.content_hash[:16]}")
        p = d.pipeline
        if p:
            lines.append(f"  pipeline output {p['file']}:{p['line']} <- {p['source']} line/row {p['offset']}")
            for v in p["provenance"]:
                score = "" if v.get("score") is None else f" score={v['score']:.4g}"
                lines.append(f"    {v['step']}: {v['verdict']}{score} ({v['detail']})")
        lines.append(f"  text: {d.text_start!r}")
    return lines
