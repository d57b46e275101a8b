"""Pipeline executor: the output bytes do not depend on the worker count, and an interrupted run
resumes to exactly the output of an uninterrupted one, skipping finished shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.data.errors import DataError
from lmforge.data.pipeline import steps as steps_mod
from lmforge.data.pipeline.config import parse_pipeline
from lmforge.data.pipeline.executor import run_pipeline

WORDS = "the quick brown fox jumps over a lazy dog and then it is gone with the wind".split()


def _corpus(tmp_path: Path) -> Path:
    src = tmp_path / "in"
    src.mkdir()
    for f in range(2):
        lines = []
        for i in range(23):
            k = f * 100 + i
            words = [WORDS[(k * 7 + j * 3) % len(WORDS)] for j in range(3 + k % 9)]
            lines.append(json.dumps({"text": "  ".join(words) + ("\r\n" if k % 4 == 0 else ""), "n": k}))
        lines.insert(5, "{broken")
        (tmp_path / "in" / f"part{f}.jsonl").write_text("\n".join(lines) + "\n")
    docs = tmp_path / "docs"
    docs.mkdir()
    for k in range(5):
        (docs / f"d{k}.txt").write_text(" ".join(WORDS[k:k + 6]))
    return tmp_path


def _cfg(root: Path, out: str, workers: int = 1, compress: bool = False):
    data = {"output_dir": out, "workers": workers, "docs_per_shard": 4, "compress": compress,
            "inputs": [{"path": "in"}, {"path": "docs", "format": "text"}],
            "steps": [{"type": "normalize"},
                      {"type": "quality", "min_words": 5, "min_stop_words": 1, "disable": ["max_top_ngram_fraction"]}]}
    return parse_pipeline(data, root, "test")


def _bytes(out: Path, name: str = "output.jsonl") -> tuple[bytes, bytes]:
    return (out / name).read_bytes(), (out / "rejects.jsonl").read_bytes()


def test_output_identical_for_1_2_4_workers(tmp_path):
    root = _corpus(tmp_path)
    outs = {}
    for w in (1, 2, 4):
        res = run_pipeline(_cfg(root, f"out{w}", w))
        outs[w] = _bytes(res.output.parent)
        assert res.skipped == 0
    assert outs[1] == outs[2] == outs[4]
    kept = [json.loads(line) for line in outs[1][0].decode().splitlines()]
    rejects = [json.loads(line) for line in outs[1][1].decode().splitlines()]
    stats = json.loads((root / "out1" / "stats.json").read_text())
    assert stats["records"] == 2 * 24 + 5 == len(kept) + len(rejects)
    assert stats["rejected"] == {"malformed_json": 2}
    assert stats["kept"] == len(kept) > 0 and sum(stats["dropped"].values()) == len(rejects) - 2 > 0
    assert [r["id"] for r in rejects if r["stage"] == "read"] == ["in/part0.jsonl:6", "in/part1.jsonl:6"]
    assert all("\r" not in d["text"] and "  " not in d["text"] for d in kept)
    assert all([v["step"] for v in d["provenance"]] == ["normalize", "quality"] for d in kept)
    assert stats["shards"] == 2 * 6 + 2  # 24 lines / 4 per shard per file, 5 text files / 4
    compressed = run_pipeline(_cfg(root, "outz", 2, compress=True))
    import zstandard

    with zstandard.ZstdDecompressor().stream_reader(open(compressed.output, "rb"), read_across_frames=True) as r:
        assert r.read() == outs[1][0]


def test_killed_run_resumes_to_identical_output(tmp_path, monkeypatch):
    root = _corpus(tmp_path)
    reference = _bytes(run_pipeline(_cfg(root, "ref")).output.parent)

    real = steps_mod.QualityStep.process
    calls = {"n": 0}

    def dies_mid_shard(self, doc):
        calls["n"] += 1
        if calls["n"] > 10:  # shards 0 and 1 (4 documents each) finish, shard 2 dies half way
            raise RuntimeError("killed")
        return real(self, doc)

    monkeypatch.setattr(steps_mod.QualityStep, "process", dies_mid_shard)
    with pytest.raises(RuntimeError, match="killed"):
        run_pipeline(_cfg(root, "run"))
    shards = root / "run" / "shards"
    assert [p.name for p in sorted(shards.iterdir())] == ["00000", "00001", "00002"]
    assert (shards / "00001" / "_DONE.json").exists() and not (shards / "00002" / "_DONE.json").exists()
    assert not (root / "run" / "output.jsonl").exists()
    monkeypatch.setattr(steps_mod.QualityStep, "process", real)
    res = run_pipeline(_cfg(root, "run", workers=2))
    assert res.skipped == 2 and _bytes(root / "run") == reference


def test_shard_without_marker_is_redone_from_scratch(tmp_path):
    root = _corpus(tmp_path)
    reference = _bytes(run_pipeline(_cfg(root, "ref")).output.parent)
    res = run_pipeline(_cfg(root, "run"))
    shard = root / "run" / "shards" / "00003"
    (shard / "_DONE.json").unlink()
    (shard / "output.jsonl").write_text('{"id": "partial"}\n')  # a half-written shard left behind
    (root / "run" / "output.jsonl").unlink()
    again = run_pipeline(_cfg(root, "run"))
    assert again.skipped == res.shards - 1 and _bytes(root / "run") == reference
    assert (shard / "_DONE.json").exists()


def test_rerun_with_a_different_pipeline_is_refused(tmp_path):
    root = _corpus(tmp_path)
    run_pipeline(_cfg(root, "run"))
    other = parse_pipeline({"output_dir": "run", "inputs": [{"path": "in"}], "docs_per_shard": 4}, root, "t")
    with pytest.raises(DataError, match="different pipeline"):
        run_pipeline(other)
