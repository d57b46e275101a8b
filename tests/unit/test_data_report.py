"""Data report and drift: JSD on known distributions, the drift verdict on the embedded corpus
(halves of one corpus: no drift; Shakespeare against the King James Bible: drift), the streamed
profile of a pipeline run with and without the executor's per-step table, and the HTML page
(self-contained: no URL, every plot an inline PNG). The page in a real browser:
tests/cli/test_data_report_browser.py."""

from __future__ import annotations

import argparse
import base64
import io
import itertools
import json
import math
import random
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from lmforge.data.corpus import iter_kjv, iter_shakespeare
from lmforge.data.drift import (
    DRIFT_THRESHOLD,
    compare_corpora,
    histogram_distance,
    jensen_shannon,
    top_vocabulary_jsd,
    verdict,
)
from lmforge.data.errors import DataError
from lmforge.data.pipeline.config import parse_pipeline
from lmforge.data.pipeline.executor import run_pipeline
from lmforge.data.pipeline.steps import quality_signals
from lmforge.data.profile import Reservoir, read_corpus, read_run
from lmforge.data.report import add_report_parser, cmd_data_report, default_report_path, write_report

WORDS = ("the quick brown fox jumps over a lazy dog and then it is gone with the wind while "
         "seven old owls watch from an oak tree near river bank").split()


# ---------------------------------------------------------------- divergences


def test_jsd_identical_is_0_disjoint_is_1_and_a_known_value():
    p = {"a": 3, "b": 1}
    assert jensen_shannon(p, {"a": 6, "b": 2}) == pytest.approx(0.0, abs=1e-12)  # same distribution, other total
    assert jensen_shannon({"a": 1, "b": 2}, {"c": 5}) == pytest.approx(1.0)
    # P = (1, 0), Q = (1/2, 1/2), M = (3/4, 1/4)
    expected = (math.log2(4 / 3) + 0.5 * math.log2(2 / 3) + 0.5 * math.log2(2)) / 2
    assert jensen_shannon({"a": 1}, {"a": 1, "b": 1}) == pytest.approx(expected)
    assert jensen_shannon({"a": 1, "b": 1}, {"a": 1}) == pytest.approx(expected)  # symmetric
    assert jensen_shannon({}, {}) == 0.0 and jensen_shannon({"a": 1}, {}) == 1.0


def test_top_vocabulary_jsd_pools_rare_words():
    a = Counter({"the": 50, "of": 30, "rare1": 1, "rare2": 1})
    b = Counter({"the": 50, "of": 30, "rare3": 1, "rare4": 1})
    assert jensen_shannon(a, b) > 0.01  # the rare words differ
    assert top_vocabulary_jsd(a, b, k=2) == pytest.approx(0.0, abs=1e-12)  # pooled, they do not
    assert top_vocabulary_jsd(a, b, k=100) == pytest.approx(jensen_shannon(a, b))


def test_histogram_distance_and_verdict():
    xs = [float(i % 17) for i in range(500)]
    assert histogram_distance(xs, list(xs)) == pytest.approx(0.0, abs=1e-12)
    assert histogram_distance([0.0, 1.0, 2.0], [10.0, 11.0]) == pytest.approx(1.0)
    assert histogram_distance([5.0] * 10, [5.0] * 3) == 0.0  # a constant: one bin, no division by zero
    assert verdict(DRIFT_THRESHOLD) == "no drift" and verdict(DRIFT_THRESHOLD + 1e-9) == "drift"


def test_reservoir_is_bounded_uniform_and_repeatable():
    r1, r2 = Reservoir(1000, seed=3), Reservoir(1000, seed=3)
    for i in range(100_000):
        r1.add(float(i))
        r2.add(float(i))
    assert r1.values == r2.values and len(r1.values) == 1000 and r1.seen == 100_000 and r1.sampled
    assert 40_000 < sum(r1.values) / len(r1.values) < 60_000  # mean of uniform 0..99999: 50,000
    small = Reservoir(10)
    for v in (1.0, 2.0):
        small.add(v)
    assert small.values == [1.0, 2.0] and not small.sampled


# ---------------------------------------------------------------- verdicts on the embedded corpus


def _write_jsonl(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps({"text": d["text"]}) + "\n" for d in docs))
    return path


def test_verdict_same_corpus_halves_no_drift_shakespeare_vs_kjv_drift(tmp_path):
    """The measurement behind DRIFT_THRESHOLD (lmforge/data/drift.py), at 50 documents a side."""
    rng = random.Random(0)
    shakespeare = rng.sample(list(iter_shakespeare()), 100)
    kjv = rng.sample(list(iter_kjv()), 100)
    s1, s2 = _write_jsonl(tmp_path / "s1.jsonl", shakespeare[:50]), _write_jsonl(tmp_path / "s2.jsonl", shakespeare[50:])
    k1, k2 = _write_jsonl(tmp_path / "k1.jsonl", kjv[:50]), _write_jsonl(tmp_path / "k2.jsonl", kjv[50:])
    profiles = {p.name: read_corpus(p) for p in (s1, s2, k1, k2)}
    same_s = compare_corpora(profiles["s1.jsonl"], profiles["s2.jsonl"])
    same_k = compare_corpora(profiles["k1.jsonl"], profiles["k2.jsonl"])
    other = compare_corpora(profiles["s1.jsonl"], profiles["k1.jsonl"])
    assert same_s.verdict == same_k.verdict == "no drift" and other.verdict == "drift"
    assert same_s.jsd < 0.03 and same_k.jsd < 0.03 and other.jsd > 0.12, (same_s.jsd, same_k.jsd, other.jsd)
    assert other.full_vocabulary_jsd > same_s.full_vocabulary_jsd > same_s.jsd  # rare words inflate it
    assert set(other.score_distances) >= {"length.words", "quality.stop_words", "quality.digit_ratio"}
    assert other.score_distances["quality.digit_ratio"] > 0.5  # KJV verses are numbered
    assert not other.notes  # ~37,000 words a side: above MIN_WORDS
    tiny = compare_corpora(_write_jsonl(tmp_path / "t.jsonl", shakespeare[:3]), s2)
    assert any("sampling noise" in n for n in tiny.notes)


# ---------------------------------------------------------------- a pipeline run


def _run(tmp_path: Path, compress: bool = False, domains: bool = False, name: str = "out",
         dedup: bool = False) -> Path:
    src = tmp_path / "in.jsonl"
    if not src.exists():
        lines = []
        for k in range(60):
            n = 2 + (k * 7) % 40  # some documents under min_words
            words = [WORDS[(k * 5 + j * 3) % len(WORDS)] for j in range(n)]
            rec = {"text": " ".join(words) + (" ###" * (k % 11 == 0) * 8)}
            if domains:
                rec["domain"] = ("web", "books", "code")[k % 3]
            lines.append(json.dumps(rec))
        lines.insert(7, "{not json")
        src.write_text("\n".join(lines) + "\n")
    cfg = parse_pipeline({"output_dir": name, "docs_per_shard": 16, "compress": compress, "inputs": [{"path": "in.jsonl"}],
                          "steps": [{"type": "normalize"},
                                    {"type": "quality", "min_words": 10, "min_stop_words": 1,
                                     "disable": ["max_top_ngram_fraction", "max_duplicate_line_fraction"]},
                                    *([{"type": "exact_dedup"}, {"type": "near_dedup"}] if dedup else [])]},
                         tmp_path, "test")
    return run_pipeline(cfg).output.parent


def test_profile_rebuilds_the_step_table_from_provenance(tmp_path):
    out = _run(tmp_path)
    stats = json.loads((out / "stats.json").read_text())
    executor_table = read_run(out).steps
    assert executor_table["quality"].seconds > 0 and executor_table["quality"].seen == 60
    del stats["steps"]  # a run written before the executor kept a step table
    (out / "stats.json").write_text(json.dumps(stats))
    p = read_run(out)
    assert p.documents == stats["kept"] > 0
    assert list(p.steps) == ["read", "normalize", "quality"]
    read, quality = p.steps["read"], p.steps["quality"]
    assert read.seen == stats["records"] == 61 and dict(read.dropped) == {"malformed_json": 1}
    assert quality.seen == 60 and quality.kept == stats["kept"]
    assert {f"quality.{k}": v for k, v in quality.dropped.items()} == stats["dropped"]
    assert quality.seconds is None and not p.step_seconds
    assert any("rebuilt from provenance" in n for n in p.notes)
    assert p.scores["quality.words"].seen == p.documents  # from the keep verdicts' "words=.." details
    signals = {f"quality.{k}" for k in quality_signals("x", 2, frozenset())}
    assert "quality.words" in p.removed_scores and set(p.removed_scores) <= signals  # the dropping signals
    assert min(p.removed_scores["quality.words"].values) >= 2 and max(p.removed_scores["quality.words"].values) < 10
    assert p.sources == Counter({"in.jsonl": p.documents}) and not p.domains


def test_profile_uses_the_executors_step_table_and_domains(tmp_path):
    out = _run(tmp_path, compress=True, domains=True)
    assert (out / "output.jsonl.zst").is_file()
    stats = json.loads((out / "stats.json").read_text())
    stats["steps"] = {"normalize": {"seen": 60, "kept": 60, "dropped": {}, "seconds": 0.5},
                      "quality": {"seen": 60, "kept": stats["kept"], "dropped": {"min_words": 60 - stats["kept"]},
                                  "seconds": 2.0},
                      "exact_dedup": {"seen": 7, "kept": 5, "dropped": {"duplicate": 2}, "seconds": 0.0}}
    (out / "stats.json").write_text(json.dumps(stats))
    p = read_run(out)
    assert list(p.steps) == ["read", "normalize", "quality", "exact_dedup"] and p.step_seconds
    assert p.steps["normalize"].docs_per_second == pytest.approx(120.0)
    assert p.steps["exact_dedup"].docs_per_second is None  # 0 seconds: no rate, no division by zero
    assert set(p.domains) == {"web", "books", "code"} and sum(p.domains.values()) == p.documents
    html = write_report(out).path.read_text()
    assert "120.0" in html and "exact_dedup: duplicate" not in html  # the bar chart is an image, the table text
    assert re.search(r"<td>exact_dedup</td><td>7</td><td>5</td><td>2</td>", html)
    assert "Documents per domain" in html


def test_a_global_steps_time_includes_its_decision_and_the_table_keeps_the_pipelines_order(tmp_path):
    """Dedup decides over all shards at once (signatures, LSH) and then only looks its decisions up
    per shard: its seconds and docs/s are both parts, not the look-up alone (which read ~900k docs/s
    for MinHash). stats.json sorts its keys, so the pipeline's order travels in `step_order`."""
    out = _run(tmp_path, dedup=True)
    stats = json.loads((out / "stats.json").read_text())
    order = ["normalize", "quality", "exact_dedup", "near_dedup"]
    assert stats["step_order"] == order and sorted(stats["steps"]) != order
    for name in ("exact_dedup", "near_dedup"):
        row = stats["steps"][name]
        decide = row["global"]["decide_seconds"]
        assert decide > 0 and row["seconds"] == pytest.approx(row["shard_seconds"] + decide, abs=2e-6)
        assert row["docs_per_second"] == pytest.approx(row["seen"] / row["seconds"], rel=1e-3)
    quality = stats["steps"]["quality"]
    assert "shard_seconds" not in quality and quality["docs_per_second"] == pytest.approx(
        quality["seen"] / quality["seconds"], rel=1e-3)
    p = read_run(out)
    assert list(p.steps) == ["read", *order]
    html = write_report(out).path.read_text()
    at = [html.index(f"<tr><td>{name}</td>") for name in ["read", *order]]
    assert at == sorted(at), at


def _images(html: str) -> dict[str, Image.Image]:
    found = re.findall(r'<img class="plot" id="plot-([\w-]+)" src="data:image/png;base64,([^"]+)"', html)
    return {name: Image.open(io.BytesIO(base64.b64decode(data))) for name, data in found}


def test_report_is_one_self_contained_page_with_every_plot(tmp_path):
    out = _run(tmp_path)
    result = write_report(out, compare_to=_run(tmp_path, name="out2"))
    assert result.path == default_report_path(out) == out / "report.html"
    html = result.path.read_text()
    assert not re.search(r"(src|href)=\"(?!data:)", html) and "http" not in html.replace("http-equiv", "")
    assert "<script" not in html
    images = _images(html)
    assert set(images) == {"lengths", "scores", "domains", "removals", "drift"}
    for name, img in images.items():
        gray = img.convert("L")
        dark = sum(gray.histogram()[:200])  # pixels clearly darker than the white background
        assert dark > 0.01 * img.width * img.height, name
    assert result.drift is not None and result.drift.verdict == "no drift" and result.drift.jsd == 0.0
    assert 'id="verdict">no drift<' in html and f'id="threshold">{DRIFT_THRESHOLD:g}<' in html
    assert "out2" in html and re.search(r"min_words: \d", html) and "malformed_json: 1" in html


def test_report_of_a_corpus_file_and_the_cli_handler(tmp_path, capsys):
    out = _run(tmp_path)
    corpus = tmp_path / "in.jsonl"
    parser = argparse.ArgumentParser(prog="lmforge data")
    add_report_parser(parser.add_subparsers(dest="data_command", required=True))
    args = parser.parse_args(["report", str(corpus), "--compare", str(out), "--out", str(tmp_path / "r.html")])
    assert args.func is cmd_data_report and args.threshold == DRIFT_THRESHOLD
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert f"report: {tmp_path / 'r.html'}" in printed and re.search(r"unigram JSD 0\.\d{4} \(threshold 0.05\): ", printed)
    html = (tmp_path / "r.html").read_text()
    assert "1 lines without a non-empty" in html  # the broken line of the raw corpus, noted
    assert default_report_path(corpus) == tmp_path / "in.jsonl.report.html"


def test_caps_are_reported_and_pruning_keeps_the_verdict(tmp_path):
    p = read_run(_run(tmp_path), reservoir_size=5)
    assert len(p.scores["length.words"].values) == 5 and p.scores["length.words"].seen == p.documents
    assert any("uniform sample of 5 values" in n for n in p.notes)
    corpus = _write_jsonl(tmp_path / "s.jsonl", list(itertools.islice(iter_shakespeare(), 0, 600, 10)))
    full, pruned = read_corpus(corpus), read_corpus(corpus, max_vocabulary=2000)
    assert len(full.unigrams) > 5000 and len(pruned.unigrams) <= 2000 and pruned.pruned_below >= 2
    assert pruned.unigram_tokens == full.unigram_tokens
    assert any("were pruned from the unigram table" in n for n in pruned.notes)
    for word, n in full.unigrams.most_common(100):  # frequent words keep (almost) their counts
        assert 0.9 * n <= pruned.unigrams[word] <= n, word
    assert compare_corpora(pruned, full).jsd < 0.002, compare_corpora(pruned, full).jsd


def test_user_errors_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "x.txt").write_text("hello")
    (tmp_path / "blank.jsonl").write_text("\n{}\n")
    for target, words in ((tmp_path / "empty", "not a finished pipeline run"), (tmp_path / "nope", "not found"),
                          (tmp_path / "x.txt", "nor a jsonl corpus"), (tmp_path / "blank.jsonl", "holds no documents")):
        with pytest.raises(DataError, match=words) as e:
            write_report(target, tmp_path / "r.html")
        assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="outside"):
        write_report(tmp_path / "blank.jsonl", tmp_path / "r.html", threshold=float("nan"))
