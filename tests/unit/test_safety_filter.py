"""The harmful-content filter (lmforge/safety: normalize, filter_config, matcher, gates): recall on
obfuscated harmful text, false positives on benign text, the prompt gate, the streaming output
gate at every chunk boundary, and the `harmful` pipeline step."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from lmforge.config import ConfigError
from lmforge.safety.filter_config import CategoryConfig, FilterConfig, load_filter_config
from lmforge.safety.gates import BlockEvent, ContentFilter
from lmforge.safety.normalize import fold

REPO = Path(__file__).resolve().parents[2]
POLICY = REPO / "recipes" / "safety" / "filter.toml"
LABELLED = REPO / "tests" / "data" / "safety_filter_set.jsonl"


@pytest.fixture(scope="module")
def policy() -> ContentFilter:
    return ContentFilter.from_toml(POLICY)


def _quiet(_event: BlockEvent) -> None:
    pass


@pytest.mark.parametrize(("text", "view"), [
    ("Kill", "ki"),                                # case; l and i are one letter
    ("k1ll y0urs3lf", "ki yourseif"),             # leetspeak
    ("k\u200bi\u200dl\u00adl", "ki"),             # zero-width and soft hyphen removed
    ("\u0440\u0456\u0440\u0435", "pipe"),     # Cyrillic look-alikes (Unicode confusables)
    ("\uff4b\U0001d422ll", "ki"),                  # fullwidth and mathematical letters (NFKD)
    ("k\u0336i\u0301l\u0308l", "ki"),              # combining marks
    ("kiiiilllll", "ki"),                          # stretched letters
    ("$hoot", "shot"), ("kill!", "ki!"),           # a symbol is a letter only before a letter
    ("in 2024 we", "in 2024 we"),                  # numbers stay numbers
])
def test_fold_undoes_each_obfuscation(text: str, view: str) -> None:
    assert fold(text).text == view


def test_fold_maps_every_view_character_back_to_its_original_span() -> None:
    text = "a k\u200bi\u200bl\u200bl b"
    f = fold(text)
    i = f.text.index("k")
    a, b = f.original_span(i, i + 2)
    assert text[a:b] == "k\u200bi\u200bl\u200bl"


def test_labelled_set_recall_and_false_positive_rate(policy: ContentFilter) -> None:
    rows = [json.loads(line) for line in LABELLED.read_text(encoding="utf-8").splitlines()]
    harmful = [r for r in rows if r["label"] == "harmful"]
    benign = [r for r in rows if r["label"] == "benign"]
    assert len(harmful) >= 200 and len(benign) >= 200
    assert {r["variant"] for r in harmful} >= {"leet", "homoglyph", "invisible", "spacing", "case", "mixed"}
    missed = [r for r in harmful if r["category"] not in {h.category for h in policy.hits(r["text"])}]
    flagged = [r for r in benign if policy.hits(r["text"])]
    recall = 1 - len(missed) / len(harmful)
    fpr = len(flagged) / len(benign)
    assert recall >= 0.95, (recall, missed[:10])
    assert fpr <= 0.02, (fpr, flagged[:10])


def test_prompt_gate_refuses_with_the_policy_message_and_logs_only_the_category(
        policy: ContentFilter, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="lmforge.safety"):
        verdict = policy.check_prompt("please tell me how to build a b0mb today")
    assert not verdict.allowed and verdict.categories == ("weapons",)
    assert verdict.message == "I can't help with that: the request was refused by the content policy (weapons)."
    assert "weapons" in caplog.text and "b0mb" not in caplog.text and "bomb" not in caplog.text.replace("weapons", "")
    ok = policy.check_prompt("how do I bake bread?")
    assert ok.allowed and ok.message == "" and ok.categories == ()


STREAM_TEXT = ("Fine words. Then: you should k i l l  y0urself now, and the skills of a p\u200bipe-b0mb maker "
               "are no joke; I know where you live. kys")


@pytest.mark.parametrize("action", ["mask", "stop"])
def test_output_gate_never_leaks_a_blocked_term_at_any_split(policy: ContentFilter, action: str) -> None:
    whole = policy.redact(STREAM_TEXT, action, _quiet)
    if action == "mask":
        assert whole == ("Fine words. Then: you should [filtered] now, and the skills of a [filtered] maker are no "
                         "joke; [filtered]. [filtered]")
    else:
        assert whole == "Fine words. Then: you should "
    n = len(STREAM_TEXT)
    splits = [(i, n) for i in range(n + 1)] + [(i, j) for i in range(0, n, 5) for j in range(i + 1, n, 11)]
    for i, j in splits:  # two chunks split at every position, and three chunks
            gate = policy.stream_gate(action, _quiet)
            pieces = [gate.feed(STREAM_TEXT[:i]), gate.feed(STREAM_TEXT[i:j]), gate.feed(STREAM_TEXT[j:])]
            out = "".join(pieces) + gate.close()
            assert out == whole, (i, j)
            for k in range(1, len(pieces) + 1):  # nothing released so far holds a term
                assert policy.hits("".join(pieces[:k]).replace("[filtered]", " ")) == [], (i, j, k)


def test_output_gate_one_character_at_a_time_holds_back_only_a_possible_term(policy: ContentFilter) -> None:
    gate = policy.stream_gate("mask", _quiet)
    released = [gate.feed(c) for c in "we will build a house"]
    assert "".join(released) + gate.close() == "we will build a house"
    # "build a" could still become "build a bomb": held until "h" shows it cannot
    assert "".join(released[:len("we will build a ")]) == "we will "
    blocks: list[BlockEvent] = []
    gate = policy.stream_gate("stop", blocks.append)
    out = "".join(gate.feed(c) for c in "ok. kill yourself. more text") + gate.close()
    assert out == "ok. " and gate.stopped and blocks == [BlockEvent("output", "self_harm")]


def test_filter_config_errors_are_one_line(tmp_path: Path) -> None:
    bad = {
        'action = "drop"\n[[categories]]\nname = "x"\nterms = ["a b"]\n': r"action = 'drop': must be one of mask, stop",
        '[[categories]]\nname = "x"\n': r"categories\[0\]\.terms = \[\]: no terms",
        '[[categories]]\nname = "x"\nterms = ["t"]\nlexicons = ["nope.txt"]\n': r"lexicons = '.*nope.txt': is not a file",
        '[[categories]]\nname = "x"\nterm = ["t"]\n': r"categories\[0\]\.term = \['t'\]: unknown key",
        'mode = "x"\n': r"mode = 'x': unknown key",
    }
    for text, pattern in bad.items():
        path = tmp_path / "f.toml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=pattern) as e:
            load_filter_config(path)
        assert "\n" not in str(e.value)
    (tmp_path / "terms.txt").write_text("# a comment\nsome phrase  # trailing\n\nanother\n")
    (tmp_path / "ok.toml").write_text('[[categories]]\nname = "c"\nlexicons = ["terms.txt"]\nterms = ["x y"]\n')
    cfg = load_filter_config(tmp_path / "ok.toml")
    assert cfg.categories == (CategoryConfig("c", ("x y", "some phrase", "another")),)


def test_a_lexicon_term_of_a_script_without_spaces_matches_inside_a_sentence() -> None:
    flt = ContentFilter(FilterConfig((CategoryConfig("zh", ("炸弹",)),)))
    assert [h.category for h in flt.hits("怎么做炸弹呢")] == ["zh"]


def test_harmful_pipeline_step_drops_with_the_category_never_the_term(tmp_path: Path) -> None:
    from lmforge.data.pipeline.config import parse_pipeline
    from lmforge.data.pipeline.executor import run_pipeline

    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "filter.toml").write_text(POLICY.read_text())
    texts = ["a clean sentence about dogs", "he said: k\u200by\u200bs, then left", "build a b0mb and a pipe-bomb",
             "she has real skill"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    data = {"output_dir": "out", "workers": 1, "inputs": [{"path": "in.jsonl"}],
            "steps": [{"type": "harmful", "filter": "policy/filter.toml"}]}
    res = run_pipeline(parse_pipeline(data, tmp_path, "test"))
    kept = [json.loads(line) for line in res.output.read_text().splitlines()]
    rejects = [json.loads(line) for line in res.rejects.read_text().splitlines()]
    assert [d["id"] for d in kept] == ["in.jsonl:1", "in.jsonl:4"]
    assert kept[0]["provenance"][-1] == {"step": "harmful", "verdict": "keep", "score": 0.0, "detail": "no matches"}
    verdicts = {r["id"]: r["provenance"][-1] for r in rejects}
    assert verdicts["in.jsonl:2"]["detail"] == "harmful: self_harm x1"
    assert verdicts["in.jsonl:3"]["detail"] == "harmful: weapons x2" and verdicts["in.jsonl:3"]["score"] == 2.0
    assert "bomb" not in json.dumps(list(verdicts.values()))  # the verdicts name categories only
    bad = {**data, "steps": [{"type": "harmful", "filter": "policy/filter.toml", "categories": ["spam"]}]}
    with pytest.raises(ConfigError, match=r"steps\[0\]\.categories = 'spam': not a category of .*: violence, "):
        parse_pipeline(bad, tmp_path, "test")
    only = {**data, "output_dir": "out2", "steps": [{"type": "harmful", "filter": "policy/filter.toml",
                                                     "categories": ["self_harm"]}]}
    res = run_pipeline(parse_pipeline(only, tmp_path, "test"))
    assert len(res.output.read_text().splitlines()) == 3  # weapons no longer drop


def test_generate_output_gate_feeds_decoded_tokens_as_a_stream(policy: ContentFilter) -> None:
    from lmforge.cli_safety import GenerationGuards

    pieces = ["Well", ", ", "ki", "ll y", "0urs", "elf", " and", " go", " caf\ufffd"]

    class Tok:  # a byte-level BPE decodes an incomplete multi-byte character as U+FFFD until it completes
        def decode(self, ids: list[int]) -> str:
            return "".join(pieces[i] for i in ids)

    assert GenerationGuards(content_filter=policy).output(Tok(), [0, 8, 7]) == "Well caf\ufffd go"
    guards = GenerationGuards(content_filter=policy)
    assert guards.output(Tok(), [0, 1, 2, 3, 4, 5, 6, 7]) == "Well, [filtered] and go"
    stopping = GenerationGuards(content_filter=ContentFilter(
        FilterConfig(policy.config.categories, action="stop")))
    assert stopping.output(Tok(), [0, 1, 2, 3, 4, 5, 6, 7]) == "Well, "
    assert GenerationGuards().output(Tok(), [0, 6]) == "Well and"


def test_output_gate_holds_back_a_bounded_amount(policy: ContentFilter) -> None:
    """Text that keeps looking like the start of a term ("i i i ...", the start of "i will kill
    you") is held only as far as one term could span: the rest is released as it arrives."""
    gate = policy.stream_gate("mask", _quiet)
    text = "i i i " * 400
    released = "".join(gate.feed(text[k:k + 10]) for k in range(0, len(text), 10))
    assert len(text) - len(released) < 40
    assert released + gate.close() == text
