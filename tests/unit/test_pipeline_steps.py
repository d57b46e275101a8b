"""Pipeline steps: normalisation results, and each quality rule dropping with its name and value."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from lmforge.config import ConfigError
from lmforge.data.pipeline.config import parse_pipeline
from lmforge.data.pipeline.document import Document
from lmforge.data.pipeline.steps import NormalizeConfig, NormalizeStep, QualityConfig, QualityStep

GOOD = "the cat sat on the mat and it was a very good day for the cat to be out in the sun"


def _run(step_cls, cfg, texts):
    drops = []
    step = step_cls(cfg, lambda d, reason, detail: drops.append((d.id, reason, detail)))
    docs = [Document(f"t:{i}", t, "t", i) for i, t in enumerate(texts)]
    return list(step.run(iter(docs))), drops, docs


def test_normalize_unicode_forms_and_whitespace():
    text = "Cafe\u0301 \uff21\t\t b  \r\n\r\n\r\n\r\nend  \n"
    (nfc,), _, _ = _run(NormalizeStep, NormalizeConfig(), [text])
    assert nfc.text == "Caf\u00e9 \uff21 b\n\nend"
    assert nfc.provenance[-1].step == "normalize" and nfc.provenance[-1].detail == "changed"
    (nfkc,), _, _ = _run(NormalizeStep, NormalizeConfig(form="NFKC", max_blank_lines=0), [text])
    assert nfkc.text == "Caf\u00e9 A b\nend"
    kept, drops, docs = _run(NormalizeStep, NormalizeConfig(), ["ok", " \u3000\t\r\n "])
    assert [d.text for d in kept] == ["ok"] and drops == [("t:1", "empty_after_normalize", "no characters left")]
    assert docs[1].provenance[-1].verdict == "drop"


@pytest.mark.parametrize("text,rule,value", [
    ("the cat sat", "min_words", 3.0),
    (GOOD + " # # # # # # # # # # # # #", "max_symbol_word_ratio", 13 / (22 + 13)),
    ("the 1234567890 and 9876543210 of 5555 to 4444 in 3333 is 2222 it 1111", "max_digit_ratio", 40 / (40 + 16)),
    ("\n".join(["the same line is here"] * 4 + [GOOD]), "max_duplicate_line_fraction", 3 / 5),
    ("go to " * 20, "max_top_ngram_fraction", 1.0),
    ("cat dog sun mat day sky red big old new", "min_stop_words", 0.0),
])
def test_quality_rule_drops_name_rule_and_value(text, rule, value):
    rules = ("min_words", "max_words", "max_symbol_word_ratio", "max_digit_ratio", "max_duplicate_line_fraction",
             "max_top_ngram_fraction", "min_stop_words")
    only = {r: None for r in rules if r != rule}  # one rule at a time: the drop is this rule's
    cfg = dataclasses.replace(QualityConfig(min_words=5), **only)
    kept, drops, docs = _run(QualityStep, cfg, [GOOD, text])
    assert [d.id for d in kept] == ["t:0"] and "stop_words=" in kept[0].provenance[-1].detail
    ((doc_id, reason, detail),) = drops
    assert (doc_id, reason) == ("t:1", rule)
    verdict = docs[1].provenance[-1]
    assert verdict.verdict == "drop" and verdict.score == pytest.approx(value)
    assert f" {value:.4g} " in detail and verdict.detail.startswith(f"{rule}: ")


def test_unset_or_disabled_rule_never_drops():
    cfg = QualityConfig(min_words=None, min_stop_words=None, max_top_ngram_fraction=None)
    kept, drops, _ = _run(QualityStep, cfg, ["go to " * 20, "x"])
    assert len(kept) == 2 and drops == []
    cfg = QualityConfig(disable=["min_words", "min_stop_words", "max_top_ngram_fraction"])
    kept, drops, _ = _run(QualityStep, cfg, ["go to " * 20, "x"])
    assert len(kept) == 2 and drops == [] and "top_ngram_fraction=1 " in kept[0].provenance[-1].detail


def test_step_options_are_checked():
    base = {"output_dir": "o", "inputs": [{"path": "."}]}
    with pytest.raises(ConfigError, match=r"steps\[0\].max_digit_ratio = -1.0: must be >= 0"):
        parse_pipeline({**base, "steps": [{"type": "quality", "max_digit_ratio": -1.0}]}, Path("."), "t")
    with pytest.raises(ConfigError, match=r"steps\[0\].min_words = '5': must be an integer"):
        parse_pipeline({**base, "steps": [{"type": "quality", "min_words": "5"}]}, Path("."), "t")
    with pytest.raises(ConfigError, match=r"steps\[0\].disable = 'min_word': unknown rule; rules: min_words, max_words"):
        parse_pipeline({**base, "steps": [{"type": "quality", "disable": ["min_word"]}]}, Path("."), "t")
