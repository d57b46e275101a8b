"""Provenance end to end: raw jsonl -> pipeline (normalize, quality, exact and near dedup) -> pack;
random packed token ranges trace back to the right raw source lines, with every step's verdict;
a dropped duplicate names the document it duplicates."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.config.job import DataConfig, TokenizerConfig
from lmforge.data.corpus import iter_kjv
from lmforge.data.errors import DataError
from lmforge.data.pack import prepare_data
from lmforge.data.pipeline.config import parse_pipeline
from lmforge.data.pipeline.executor import run_pipeline
from lmforge.data.tokenizer import TextTokenizer
from lmforge.data.trace import trace_tokens


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """Raw sources: two jsonl files of KJV chapters (one line each, some lines doubled as exact
    copies, one broken line); pipeline -> output.jsonl -> data.corpus -> packed dir."""
    root = tmp_path_factory.mktemp("trace")
    chapters = [d["text"] for _, d in zip(range(80), iter_kjv())]
    (root / "raw").mkdir()
    raw: dict[tuple[str, int], str] = {}
    for f, part in enumerate((chapters[:40], chapters[40:])):
        lines = [json.dumps({"text": t}) for t in part]
        lines.insert(3, "{broken")
        lines.append(json.dumps({"text": part[5].replace(" ", "   ")}))  # an exact copy, other spacing
        (root / "raw" / f"part{f}.jsonl").write_text("\n".join(lines) + "\n")
        for n, line in enumerate(lines, 1):
            if line != "{broken":
                raw[(f"raw/part{f}.jsonl", n)] = json.loads(line)["text"]
    cfg = parse_pipeline({"output_dir": "clean", "docs_per_shard": 9, "inputs": [{"path": "raw"}],
                          "steps": [{"type": "normalize"}, {"type": "quality", "min_words": 20},
                                    {"type": "exact_dedup"}, {"type": "near_dedup"}]}, root, "test")
    res = run_pipeline(cfg)
    data = prepare_data(DataConfig(corpus=str(res.output), dir=str(root / "data"), val_fraction=0.1, seed=3),
                        TokenizerConfig(vocab_size=400, min_frequency=2), log=lambda _: None)
    return root, raw, res, data


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text)


def test_random_token_ranges_trace_back_to_their_source_lines(traced):
    root, raw, _, data = traced
    tok = TextTokenizer.from_file(data / "tokenizer.json")
    manifest = json.loads((data / "manifest.json").read_text())
    n_tokens = manifest["splits"]["train"]["tokens"]
    import numpy as np

    tokens = np.fromfile(data / "train.bin", dtype=manifest["dtype"])
    rng = random.Random(0)
    for _ in range(25):
        offset = rng.randrange(n_tokens - 40)
        docs = trace_tokens(data, offset, 40)
        assert docs and docs[0].tokens[0] <= offset < docs[0].tokens[1] + 1
        for d in docs:
            p = d.pipeline
            source_text = raw[(p["source"], p["offset"])]  # the raw line the pipeline read
            assert _words(source_text) == _words(tok.decode(tokens[d.tokens[0]:d.tokens[1]].tolist()))
            assert [v["step"] for v in p["provenance"]] == ["normalize", "quality", "exact_dedup", "near_dedup"]
            assert all(v["verdict"] == "keep" for v in p["provenance"])


def test_dropped_copy_names_the_document_it_duplicates(traced):
    _, raw, res, _ = traced
    drops = [json.loads(line) for line in res.rejects.read_text().splitlines()]
    dup = {r["id"]: r["provenance"][-1] for r in drops if r["stage"] == "exact_dedup"}
    assert set(dup) == {"raw/part0.jsonl:42", "raw/part1.jsonl:42"}
    assert dup["raw/part0.jsonl:42"]["duplicate_of"] == "raw/part0.jsonl:7"  # part[5] is line 7 (after the broken one)
    assert dup["raw/part1.jsonl:42"]["duplicate_of"] == "raw/part1.jsonl:7"
    assert [r["reason"] for r in drops if r["stage"] == "read"] == ["malformed_json", "malformed_json"]


def test_trace_cli_prints_the_chain_and_refuses_a_bad_offset(traced, capsys):
    _, _, _, data = traced
    assert main(["data", "trace", str(data), "0", "--length", "3"]) == 0
    out = capsys.readouterr().out
    assert "train document 0: tokens [0," in out and "<- raw/part" in out and "exact_dedup: keep" in out
    assert main(["data", "trace", str(data), "99999999"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "offset must be in [0," in err
    with pytest.raises(DataError, match="length >= 1"):
        trace_tokens(data, 0, 0)


def test_a_range_over_every_document_reads_each_file_once(traced, monkeypatch):
    """A long range used to stream the packed corpus once per document it touched (quadratic in
    the corpus): each file is now read in one pass, and the documents are the same as traced
    one by one."""
    from lmforge.data import trace

    _, _, _, data = traced
    n_tokens = json.loads((data / "manifest.json").read_text())["splits"]["train"]["tokens"]
    one_by_one = []
    offset = 0
    while offset < n_tokens:
        (first, *_) = trace_tokens(data, offset, 1)
        one_by_one.append(first)
        offset = first.tokens[1] + 1
    opened: list[str] = []

    def counting_open(path, *args, **kwargs):
        opened.append(str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(trace, "open", counting_open, raising=False)
    docs = trace_tokens(data, 0, n_tokens)
    assert len(docs) == len(one_by_one) > 20
    assert docs == one_by_one
    # the packed corpus.jsonl, then the pipeline's output.jsonl it was made from: each once
    assert [Path(f).name for f in opened] == ["corpus.jsonl", "output.jsonl"], opened


def test_the_default_corpus_traces_through_the_default_pipeline(tiny_data_dir):
    """The main job's pack holds rows of the default pipeline's output.jsonl, not of corpus.jsonl:
    trace read corpus.jsonl at those rows (the raw text, and the wrong document once a step drops
    one) and printed no verdict. Every traced document's tokens decode to its pipeline record's
    text, the record names its corpus.jsonl line, and that line is the document named."""
    import numpy as np

    data = tiny_data_dir
    manifest = json.loads((data / "manifest.json").read_text())
    tok = TextTokenizer.from_file(data / "tokenizer.json")
    tokens = np.fromfile(data / "train.bin", dtype=manifest["dtype"])
    output = [json.loads(line) for line in (data / "pipeline" / "output.jsonl").read_text().splitlines()]
    corpus = [json.loads(line) for line in (data / "corpus.jsonl").read_text().splitlines()]
    rng = random.Random(1)
    seen = 0
    for _ in range(20):
        for d in trace_tokens(data, rng.randrange(manifest["splits"]["train"]["tokens"] - 30), 30):
            rec = output[d.pipeline["line"] - 1]
            assert tok.decode(tokens[d.tokens[0]:d.tokens[1]].tolist()) == rec["text"]
            assert d.content_hash == rec["content_sha256"] and d.corpus_line == rec["offset"]
            assert corpus[d.corpus_line - 1]["id"] == d.id == rec["metadata"]["id"]
            assert [v["step"] for v in d.pipeline["provenance"]][-1] == "domain"
            seen += 1
    assert seen >= 20
