"""The `eda` step: Easy Data Augmentation copies after each document, deterministic for any
worker count, each operation doing what it says."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from lmforge.config import ConfigError
from lmforge.data.pipeline.config import parse_pipeline
from lmforge.data.pipeline.document import Document
from lmforge.data.pipeline.eda import (
    EdaConfig,
    EdaStep,
    random_deletion,
    random_insertion,
    random_swap,
    read_synonyms,
    synonym_replacement,
)
from lmforge.data.pipeline.executor import run_pipeline

SYNONYMS = """# word: synonyms
quick: fast, rapid
happy: glad, cheerful, joyful
dog: hound
"""
WORDS = "The quick brown dog was happy, and the quick cat was not happy at all today".split()


@pytest.fixture
def table(tmp_path) -> dict[str, list[str]]:
    (tmp_path / "syn.txt").write_text(SYNONYMS)
    return read_synonyms(tmp_path / "syn.txt")


def test_random_deletion_keeps_at_least_one_word():
    for seed in range(20):
        out, changes = random_deletion(WORDS, 1.0, random.Random(seed))
        assert len(out) == 1 and out[0] in WORDS and changes == len(WORDS) - 1
    assert random_deletion(WORDS, 0.0, random.Random(0)) == (WORDS, 0)
    out, changes = random_deletion(WORDS, 0.5, random.Random(1))
    assert 0 < len(out) < len(WORDS) and changes == len(WORDS) - len(out)
    it = iter(WORDS)
    assert all(w in it for w in out)  # a subsequence of the original


def test_random_swap_keeps_the_multiset_of_words():
    out, changes = random_swap(WORDS, 3, random.Random(0))
    assert Counter(out) == Counter(WORDS) and out != WORDS and changes == 3
    assert sum(a != b for a, b in zip(out, WORDS, strict=True)) <= 6
    assert random_swap(["alone"], 3, random.Random(0)) == (["alone"], 0)


def test_synonym_replacement_replaces_every_occurrence_of_chosen_words(table):
    chosen = set()
    for seed in range(10):
        out, changes = synonym_replacement(WORDS, 1, table, random.Random(seed))
        changed = {(a, b) for a, b in zip(WORDS, out, strict=True) if a != b}
        sources = {a.strip(",").lower() for a, _ in changed}
        assert len(sources) == 1  # n = 1 distinct word
        word = sources.pop()
        chosen.add(word)
        assert changes == sum(w.strip(",").lower() == word for w in WORDS)  # every occurrence
        for a, b in changed:
            assert b.strip(",") in table[word] and a.endswith(",") == b.endswith(",")  # punctuation kept
    assert chosen == {"quick", "happy", "dog"}  # quick and happy occur twice
    out, changes = synonym_replacement(WORDS, 10, table, random.Random(0))
    assert changes == 5 and not {"quick", "happy", "happy,", "dog"} & set(out)
    assert synonym_replacement(WORDS, 3, {}, random.Random(0)) == (WORDS, 0)


def test_random_insertion_inserts_synonyms_of_words_in_the_text(table):
    out, changes = random_insertion(WORDS, 4, table, random.Random(0))
    assert len(out) == len(WORDS) + 4 and changes == 4
    extra = Counter(out) - Counter(WORDS)
    assert sum(extra.values()) == 4
    assert set(extra) <= {s for w in ("quick", "happy", "dog") for s in table[w]}
    it = iter(out)
    assert all(w in it for w in WORDS)  # the original words, in order
    assert random_insertion(["no", "synonyms"], 2, table, random.Random(0)) == (["no", "synonyms"], 0)


def _augment(cfg: EdaConfig, text: str = " ".join(WORDS)) -> list[Document]:
    step = EdaStep(cfg, lambda *a: None)
    return list(step.run(iter([Document("src:1", text, "src", 1, {"lang": "en"})])))


def test_copies_follow_the_original_with_ids_metadata_and_provenance(tmp_path, table):
    cfg = EdaConfig(synonyms=str(tmp_path / "syn.txt"), copies=6, seed=3)
    out = _augment(cfg)
    assert [d.id for d in out] == ["src:1"] + [f"src:1#eda{k}" for k in range(1, 7)]
    assert out[0].text == " ".join(WORDS) and out[0].provenance[-1].detail == "original; 6 augmented copies follow"
    ops = [d.metadata["eda"]["operations"] for d in out[1:]]
    assert ops == [["sr"], ["ri"], ["rs"], ["rd"], ["sr"], ["ri"]]
    for k, d in enumerate(out[1:], 1):
        assert d.metadata["lang"] == "en" and d.metadata["eda"]["of"] == "src:1" and d.metadata["eda"]["copy"] == k
        v = d.provenance[-1]
        assert v.step == "eda" and v.verdict == "keep" and v.score == d.metadata["eda"]["changes"]
        assert v.detail.startswith(f"copy {k} of src:1: {ops[k - 1][0]}")
    assert Counter(out[3].text.split()) == Counter(WORDS)  # rs
    assert len(out[4].text.split()) <= len(WORDS)  # rd
    # the same (seed, id) gives the same copies; another seed other ones
    assert [d.text for d in _augment(cfg)] == [d.text for d in out]
    other = _augment(EdaConfig(synonyms=str(tmp_path / "syn.txt"), copies=6, seed=4))
    assert [d.text for d in other[1:]] != [d.text for d in out[1:]]


def test_without_synonyms_only_swap_and_deletion_run():
    out = _augment(EdaConfig(copies=4))
    assert [d.metadata["eda"]["operations"] for d in out[1:]] == [["rs"], ["rd"], ["rs"], ["rd"]]
    assert _augment(EdaConfig(copies=2), text="   ")[0].provenance[-1].detail == "original; no words to augment"
    assert len(_augment(EdaConfig(copies=2), text="   ")) == 1


def test_eda_end_to_end_is_identical_for_one_and_two_workers(tmp_path):
    (tmp_path / "syn.txt").write_text(SYNONYMS)
    texts = [f"document {i}: the quick dog was happy {i} times over and over again" for i in range(9)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    outs = []
    for workers in (1, 2):
        data = {"output_dir": f"out{workers}", "workers": workers, "docs_per_shard": 2,
                "inputs": [{"path": "in.jsonl"}],
                "steps": [{"type": "eda", "synonyms": "syn.txt", "copies": 3, "alpha_rs": 0.3, "p_rd": 0.3},
                          {"type": "lexicon", "terms": ["hound"], "max_hits": 0}]}
        outs.append(run_pipeline(parse_pipeline(data, tmp_path, "test")))
    assert outs[0].output.read_bytes() == outs[1].output.read_bytes()
    assert outs[0].rejects.read_bytes() == outs[1].rejects.read_bytes()
    docs = [json.loads(line) for line in outs[0].output.read_text().splitlines()]
    rejects = [json.loads(line) for line in outs[0].rejects.read_text().splitlines()]
    assert len(docs) + len(rejects) == 9 * 4
    ids = [d["id"] for d in docs] + [r["id"] for r in rejects]
    assert sorted(ids) == sorted(f"in.jsonl:{i}" + s for i in range(1, 10) for s in ("", "#eda1", "#eda2", "#eda3"))
    assert all("#eda" in r["id"] and r["reason"] == "max_hits" for r in rejects)  # "dog" -> "hound" copies
    assert rejects and all(r["provenance"][-2]["step"] == "eda" for r in rejects)
    steps = outs[0].totals["steps"]
    assert steps["eda"]["seen"] == 9 and steps["eda"]["kept"] == 36 and steps["lexicon"]["seen"] == 36


def test_bad_eda_options_are_one_line(tmp_path):
    (tmp_path / "in.jsonl").write_text("")
    (tmp_path / "bad.txt").write_text("quick fast rapid\n")
    cases = [
        ({"copies": 0}, r"steps\[0\]\.copies = 0: must be >= 1"),
        ({"alpha_rs": 1.5}, r"steps\[0\]\.alpha_rs = 1.5: must be in \[0, 1\]"),
        ({"synonyms": "missing.txt"}, r"steps\[0\]\.synonyms = '.*missing.txt': is not a file"),
        ({"synonyms": "bad.txt"}, r"steps\[0\]\.synonyms = '.*bad.txt:1': lines must read"),
        ({"alpha_rs": 0.0, "p_rd": 0.0}, r"steps\[0\]\.alpha_rs = 0.0: no operation enabled"),
    ]
    for options, message in cases:
        data = {"output_dir": "x", "inputs": [{"path": "in.jsonl"}], "steps": [{"type": "eda", **options}]}
        with pytest.raises(ConfigError, match=message) as e:
            parse_pipeline(data, tmp_path, "test")
        assert "\n" not in str(e.value)
