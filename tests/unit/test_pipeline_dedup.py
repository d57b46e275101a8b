"""Dedup steps in the pipeline: exact copies and verified near-duplicates are dropped across shards
and files, each drop names the document it duplicates; the output does not depend on the worker
count; a run killed in any stage resumes to the uninterrupted output; an index carries exact
dedup across runs."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from lmforge.config import ConfigError
from lmforge.data.corpus import iter_shakespeare
from lmforge.data.pipeline import dedup as dedup_mod
from lmforge.data.pipeline.config import parse_pipeline
from lmforge.data.pipeline.document import content_hash
from lmforge.data.pipeline.executor import run_pipeline


def _shingles(words: list[str]) -> set[tuple[str, ...]]:
    w = [x.lower() for x in words]
    return {tuple(w[i:i + 5]) for i in range(max(1, len(w) - 4))}


def _jaccard(a: list[str], b: list[str]) -> float:
    x, y = _shingles(a), _shingles(b)
    return len(x & y) / len(x | y)


def _passages(n: int, size: int = 300) -> list[list[str]]:
    words = [w for doc in iter_shakespeare() for w in re.findall(r"\w+", doc["text"])]
    return [words[i * size:(i + 1) * size] for i in range(n)]


def _edited(words: list[str], target: float, rng: random.Random) -> list[str]:
    copy = list(words)
    while _jaccard(words, copy) > target:
        copy[rng.randrange(len(copy))] = rng.choice(words) + "x"
    return copy


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    """in/a.jsonl: 40 originals of 300 words. in/b.jsonl: exact copies (other spacing),
    near-duplicates at Jaccard 0.85-0.93, far edits at ~0.4, interleaved with 20 new passages."""
    root = tmp_path_factory.mktemp("dedup")
    (root / "in").mkdir()
    passages = _passages(60)
    originals, fresh = passages[:40], passages[40:]
    rng = random.Random(3)
    b_lines, truth = [], {"exact": {}, "near": {}, "far": set()}
    for i, p in enumerate(originals[:30]):
        kind = ("exact", "near", "near", "far")[i % 4]
        if kind == "exact":
            text = "  ".join(p)
        else:
            target = {"near": 0.93 if i % 8 == 1 else 0.88, "far": 0.4}[kind]
            edited = _edited(p, target, rng)
            assert (_jaccard(p, edited) >= 0.85) == (kind == "near")  # the truth, from plain sets
            text = " ".join(edited)
        b_lines.append({"text": text})
        line = len(b_lines)
        if kind == "far":
            truth["far"].add(f"in/b.jsonl:{line}")
        else:
            truth[kind][f"in/b.jsonl:{line}"] = f"in/a.jsonl:{i + 1}"
        if i < len(fresh):
            b_lines.append({"text": " ".join(fresh[i])})
    (root / "in" / "a.jsonl").write_text("".join(json.dumps({"text": " ".join(p)}) + "\n" for p in originals))
    (root / "in" / "b.jsonl").write_text("".join(json.dumps(x) + "\n" for x in b_lines))
    return root, truth


def _cfg(root: Path, out: str, workers: int = 1, index: str = "", inputs: list[str] | None = None):
    exact = {"type": "exact_dedup", **({"index": index} if index else {})}
    data = {"output_dir": out, "workers": workers, "docs_per_shard": 7,
            "inputs": [{"path": p} for p in (inputs or ["in"])],
            "steps": [{"type": "normalize"}, exact, {"type": "near_dedup", "threshold": 0.8}]}
    return parse_pipeline(data, root, "test")


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_duplicates_dropped_across_shards_naming_the_kept_document(corpus):
    root, truth = corpus
    res = run_pipeline(_cfg(root, "out1"))
    drops = {r["id"]: r for r in _read(res.rejects)}
    raw = {f"in/{f.name}:{n}": json.loads(line)["text"] for f in sorted((root / "in").iterdir())
           for n, line in enumerate(f.read_text().splitlines(), 1)}
    for kind in ("exact", "near"):
        for dup, original in truth[kind].items():
            assert dup in drops, (kind, dup)
            verdict = drops[dup]["provenance"][-1]
            assert verdict["step"] == f"{kind}_dedup" and verdict["duplicate_of"] == original
    assert all(drops[d]["provenance"][-1]["score"] >= 0.8 for d in truth["near"])
    assert all(r["content_sha256"] == content_hash(raw[r["id"]]) for r in drops.values())
    assert all(d["content_sha256"] == content_hash(d["text"]) for d in _read(res.output))
    kept = {d["id"] for d in _read(res.output)}
    assert truth["far"] <= kept and len(drops) == len(truth["exact"]) + len(truth["near"])
    assert all([v["step"] for v in d["provenance"]] == ["normalize", "exact_dedup", "near_dedup"]
               for d in _read(res.output))
    stats = json.loads((root / "out1" / "stats.json").read_text())
    assert stats["dropped"] == {"exact_dedup.duplicate": len(truth["exact"]),
                                "near_dedup.duplicate": len(truth["near"])}
    assert stats["steps"]["near_dedup"]["global"]["verified"] >= len(truth["near"])
    assert stats["steps"]["exact_dedup"]["seen"] == 40 + 30 + 20
    assert res.shards == 6 + 8  # 40 / 7 and 50 / 7 records per shard
    for w in (2, 4):
        other = run_pipeline(_cfg(root, f"out{w}", workers=w))
        assert other.output.read_bytes() == res.output.read_bytes()
        assert other.rejects.read_bytes() == res.rejects.read_bytes()


@pytest.mark.parametrize("where", ["global step", "stage after it"])
def test_killed_run_resumes_to_identical_output(corpus, monkeypatch, where):
    root, _ = corpus
    reference = run_pipeline(_cfg(root, f"ref-{where}"))
    target, name = (dedup_mod.NearDedupStep, "decide") if where == "global step" else (dedup_mod.DecisionStep,
                                                                                        "process")
    real = getattr(target, name)
    calls = {"n": 0}

    def dies(self, *args):  # the global step dies at once; the stage after it half way through
        calls["n"] += 1
        if where == "global step" or calls["n"] > 30:
            raise RuntimeError("killed")
        return real(self, *args)

    monkeypatch.setattr(target, name, dies)
    out = f"run-{where}"
    with pytest.raises(RuntimeError, match="killed"):
        run_pipeline(_cfg(root, out))
    assert not (root / out / "output.jsonl").exists()
    monkeypatch.setattr(target, name, real)
    again = run_pipeline(_cfg(root, out, workers=2))
    assert again.skipped == again.shards  # stage 0 was finished before the kill
    assert again.output.read_bytes() == reference.output.read_bytes()
    assert again.rejects.read_bytes() == reference.rejects.read_bytes()


def test_index_carries_exact_dedup_across_runs(corpus):
    root, truth = corpus
    first = run_pipeline(_cfg(root, "runA", index="idx/hashes.jsonl", inputs=["in/a.jsonl"]))
    assert len(_read(first.output)) == 40
    index = _read(root / "idx" / "hashes.jsonl")
    assert len(index) == 40 and len({e["run"] for e in index}) == 1
    # run A again in place: its own entries do not make its documents duplicates
    again = run_pipeline(_cfg(root, "runA", index="idx/hashes.jsonl", inputs=["in/a.jsonl"]))
    assert again.output.read_bytes() == first.output.read_bytes()
    second = run_pipeline(_cfg(root, "runB", index="idx/hashes.jsonl", inputs=["in/b.jsonl"]))
    drops = {r["id"]: r["provenance"][-1] for r in _read(second.rejects)}
    for dup, original in truth["exact"].items():
        v = drops[dup.replace("in/b.jsonl", "b.jsonl")]
        assert v["step"] == "exact_dedup" and v["duplicate_of"] == original.replace("in/a.jsonl", "a.jsonl")
        assert "earlier run" in v["detail"]
    assert len(_read(root / "idx" / "hashes.jsonl")) == 40 + 50 - len(truth["exact"])


def test_bad_dedup_options_are_one_line(corpus):
    root, _ = corpus
    data = {"output_dir": "x", "inputs": [{"path": "in"}], "steps": [{"type": "near_dedup", "bands": 7}]}
    with pytest.raises(ConfigError, match=r"steps\[0\]\.bands = 7: must divide num_perm = 128"):
        parse_pipeline(data, root, "test")
    data["steps"] = [{"type": "exact_dedup", "index": "in"}]
    with pytest.raises(ConfigError, match=r"steps\[0\]\.index = .*must be a file path"):
        parse_pipeline(data, root, "test")
