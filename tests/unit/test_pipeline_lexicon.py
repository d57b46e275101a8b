"""The `lexicon` step: whole-word, case-insensitive matches of configured terms and phrases
(benign stand-in words here; no word list ships with lmforge)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.config import ConfigError
from lmforge.data.pipeline.config import parse_pipeline
from lmforge.data.pipeline.document import Document
from lmforge.data.pipeline.executor import run_pipeline
from lmforge.data.pipeline.lexicon import LexiconConfig, LexiconStep, compile_terms

LEXICON = """# mild stand-ins for a real list
heck
darn   # a trailing comment
Good Grief
cat
ice
ice cream

heck
"""


def _step(tmp_path: Path, **options) -> tuple[LexiconStep, list]:
    (tmp_path / "mild.txt").write_text(LEXICON)
    dropped: list = []
    cfg = LexiconConfig(lexicons=[str(tmp_path / "mild.txt")], **options)
    cfg.validate("steps[0].", None)
    return LexiconStep(cfg, lambda doc, reason, detail: dropped.append((doc.id, reason))), dropped


def _judge(step: LexiconStep, text: str) -> tuple[bool, float, str]:
    doc = Document("d", text, "s", 0)
    kept = step.process(doc)
    return kept, doc.provenance[-1].score, doc.provenance[-1].detail


def test_terms_match_whole_words_case_insensitively_and_phrases_across_spaces(tmp_path):
    step, _ = _step(tmp_path, max_hits=100)
    text = ("Heck, HECK and heckle. The cat sat on a category of concatenated cats; CAT! "
            "Good   grief,\ngood\tGRIEF. Goodgrief. Darned darn-it. Ice cream, iced ice creamy.")
    kept, score, detail = _judge(step, text)
    # heck x2 (not heckle), cat x2 (not category, concatenated, cats), good grief x2 (not goodgrief),
    # darn x1 (darn-it: "-" ends a word; not darned), ice cream x1 (the longer term, not "ice" too),
    # ice x1 (the "ice" of "ice creamy", where the phrase would end inside a word; not iced)
    assert kept and score == 9.0
    assert detail.startswith("9 hits, ")
    assert "'heck' x2, 'cat' x2, 'good grief' x2, 'darn' x1, 'ice cream' x1" in detail
    assert "(+1 more terms)" in detail  # the 6th term, ice, is counted but not named


def test_nothing_matches_inside_words(tmp_path):
    step, _ = _step(tmp_path, max_hits=0)
    kept, score, detail = _judge(step, "Scatter the heckler; darning catalogues of iced goodgriefs.")
    assert kept and score == 0.0 and detail == "0 hits, 0 per word"


def test_terms_of_unspaced_scripts_match_inside_their_text(tmp_path):
    """Chinese has no word edges: a Chinese term matched nothing under the whole-word rule; it now
    matches anywhere on its unspaced side, and Latin ends keep the whole-word rule."""
    (tmp_path / "zh.txt").write_text("坏人\n坏 guy\nわるい\n")
    dropped: list = []
    cfg = LexiconConfig(lexicons=[str(tmp_path / "zh.txt")], max_hit_ratio=0.05)
    step = LexiconStep(cfg, lambda doc, reason, detail: dropped.append(reason))
    kept, score, detail = _judge(step, "他是一个坏人。那个坏人走了，坏 guy 和坏 guys 不同。わるいこと")
    assert score == 4.0, detail  # 坏人 x2, 坏 guy x1 (not 坏 guys: "guy" ends inside a word), わるい x1
    # 4 hits in 24 words (17 Han characters, 5 kana, "guy" and "guys"): 0.1667 > 0.05
    assert not kept and "0.1667 per word" in detail and dropped == ["max_hit_ratio"]
    assert compile_terms(["人"]).findall("人人") == ["人", "人"]


def test_max_hits_and_max_hit_ratio_drop_above_their_limits(tmp_path):
    step, dropped = _step(tmp_path, max_hits=2)
    assert _judge(step, "heck heck fine words here")[0]  # 2 hits: not more than 2
    kept, score, detail = _judge(step, "heck darn heck and more")
    assert not kept and score == 3.0 and "> max_hits 2" in detail and dropped == [("d", "max_hits")]
    step, dropped = _step(tmp_path, max_hit_ratio=0.25)
    assert _judge(step, "heck one two three")[0]  # 1 of 4 words = 0.25
    kept, score, detail = _judge(step, "heck heck one two three")  # 2 of 5 = 0.4
    assert not kept and score == 2.0 and "0.4 per word" in detail and dropped == [("d", "max_hit_ratio")]


def test_a_large_lexicon_is_one_trie_pattern(tmp_path):
    terms = [f"w{i:04d}x" for i in range(3000)] + ["w0001", "w0001x y"]
    pattern = compile_terms(sorted(terms))
    found = [m.group(0) for m in pattern.finditer("w0001x y w0001x w0001 w0001xy w2999x w3000x")]
    assert found == ["w0001x y", "w0001x", "w0001", "w2999x"]


def test_lexicon_step_end_to_end(tmp_path):
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "mild.txt").write_text(LEXICON)
    texts = ["a clean sentence about dogs", "heck heck heck what a day", "good grief, one darn cat"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    data = {"output_dir": "out", "workers": 2, "docs_per_shard": 1, "inputs": [{"path": "in.jsonl"}],
            "steps": [{"type": "lexicon", "lexicons": ["lists/mild.txt"], "terms": ["dogs"], "max_hits": 2}]}
    res = run_pipeline(parse_pipeline(data, tmp_path, "test"))
    kept = [json.loads(line) for line in res.output.read_text().splitlines()]
    rejects = [json.loads(line) for line in res.rejects.read_text().splitlines()]
    assert [(d["id"], d["provenance"][-1]["score"]) for d in kept] == [("in.jsonl:1", 1.0)]  # "dogs", inline
    assert sorted((r["id"], r["reason"], r["provenance"][-1]["score"]) for r in rejects) == [
        ("in.jsonl:2", "max_hits", 3.0), ("in.jsonl:3", "max_hits", 3.0)]


def test_bad_lexicon_options_are_one_line(tmp_path):
    (tmp_path / "in.jsonl").write_text("")
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    cases = [
        ({"lexicons": ["missing.txt"], "max_hits": 1}, r"steps\[0\]\.lexicons = '.*missing.txt': is not a file"),
        ({"terms": ["x"]}, r"steps\[0\]\.max_hits = None: set max_hits and/or max_hit_ratio"),
        ({"lexicons": ["empty.txt"], "max_hits": 1}, r"steps\[0\]\.terms = \[\]: no terms"),
        ({"terms": ["x"], "max_hits": -1}, r"steps\[0\]\.max_hits = -1: must be >= 0"),
        ({"terms": ["x"], "max_hit_ratio": -0.5}, r"steps\[0\]\.max_hit_ratio = -0.5: must be >= 0"),
    ]
    for options, message in cases:
        data = {"output_dir": "x", "inputs": [{"path": "in.jsonl"}], "steps": [{"type": "lexicon", **options}]}
        with pytest.raises(ConfigError, match=message) as e:
            parse_pipeline(data, tmp_path, "test")
        assert "\n" not in str(e.value)
