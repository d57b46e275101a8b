"""The `lm_score` step: a Kneser–Ney n-gram model trained by the pipeline on a reference set, as a
per-shard perplexity threshold and as a corpus-wide keep_top_fraction (a global step)."""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path

import pytest

from lmforge.config import ConfigError
from lmforge.data.corpus import iter_kjv, iter_shakespeare
from lmforge.data.errors import DataError
from lmforge.data.pipeline import ngram
from lmforge.data.pipeline.config import parse_pipeline
from lmforge.data.pipeline.executor import run_pipeline
from lmforge.data.pipeline.ngram import EOS, UNK, load_model, train_model


def _shuffled(text: str, seed: int) -> str:
    words = text.split()
    random.Random(seed).shuffle(words)
    return " ".join(words)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    """ref.jsonl: 240 Shakespeare blocks (every 5th block of the works, i % 5 == 1). in/: 20
    held-out Shakespeare blocks (i % 5 == 3), 20 KJV chapters, 20 shuffled held-out blocks."""
    root = tmp_path_factory.mktemp("lm")
    sh = [d["text"] for d in iter_shakespeare()]
    ref = [t for i, t in enumerate(sh) if i % 5 == 1][:240]
    held = [t for i, t in enumerate(sh) if i % 5 == 3][:20]
    kjv = [d["text"] for d in iter_kjv()][::40][:20]
    shuffled = [_shuffled(t, i) for i, t in enumerate(held)]
    (root / "ref.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ref))
    (root / "in").mkdir()
    for name, texts in (("a_held", held), ("b_kjv", kjv), ("c_shuffled", shuffled)):
        (root / "in" / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return root, {"ref": ref, "held": held, "kjv": kjv, "shuffled": shuffled}


@pytest.fixture(scope="module")
def model(corpus):
    root, _ = corpus
    return load_model(str(root / "ref.jsonl"), 3, "word", 2)


def test_held_out_shakespeare_is_more_probable_than_kjv_and_shuffled_words(corpus, model):
    _, texts = corpus
    ppl = {k: [model.perplexity(t)[0] for t in texts[k]] for k in ("held", "kjv", "shuffled")}
    med = {k: statistics.median(v) for k, v in ppl.items()}
    assert med["held"] < 0.75 * med["kjv"], med
    assert med["held"] < 0.5 * med["shuffled"], med
    # document by document: the same words in a random order are always less probable
    assert all(h < s for h, s in zip(ppl["held"], ppl["shuffled"], strict=True))
    # a character model agrees
    char = train_model(texts["ref"][:80], 5, "char")
    c = {k: statistics.median(char.perplexity(t)[0] for t in texts[k]) for k in ("held", "kjv", "shuffled")}
    assert c["held"] < c["kjv"] and c["held"] < c["shuffled"], c


def test_probabilities_of_every_next_unit_sum_to_one(model):
    s = model.encode("But soft, what light through yonder window breaks? It is the east")
    alphabet = [*model.codes.values(), UNK, EOS]
    assert len(alphabet) == model.vocab
    for i in (2, 5, 9, len(s) - 1):  # a full context of seen and of unseen n-grams
        total = sum(math.exp(model.log_prob(s[:i] + w, i)) for w in alphabet)
        assert total == pytest.approx(1.0, abs=1e-9)


def test_model_is_trained_once_per_process_and_cached_on_disk(corpus, tmp_path, monkeypatch):
    root, _ = corpus
    calls = []
    real = ngram.train_model
    monkeypatch.setattr(ngram, "train_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    ngram._load_model.cache_clear()
    m1 = load_model(str(root / "ref.jsonl"), 2, "word", 2, str(tmp_path / "cache"))
    m2 = load_model(str(root / "ref.jsonl"), 2, "word", 2, str(tmp_path / "cache"))
    assert m1 is m2 and len(calls) == 1
    ngram._load_model.cache_clear()  # a new process: the pickle, not a retraining
    m3 = load_model(str(root / "ref.jsonl"), 2, "word", 2, str(tmp_path / "cache"))
    assert len(calls) == 1 and m3.tables == m1.tables
    assert len(list((tmp_path / "cache").glob("ngram-*.pkl"))) == 1


def _run(root: Path, out: str, step: dict, workers: int = 1, inputs: tuple[str, ...] = ("in",)):
    data = {"output_dir": out, "workers": workers, "docs_per_shard": 7, "inputs": [{"path": p} for p in inputs],
            "steps": [{"type": "normalize"}, {"type": "lm_score", "reference": "ref.jsonl", **step}]}
    return run_pipeline(parse_pipeline(data, root, "test"))


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_max_perplexity_drops_above_it_and_every_verdict_carries_the_perplexity(corpus, model):
    root, texts = corpus
    limit = statistics.median(model.perplexity(t)[0] for t in texts["held"] + texts["kjv"])
    res = _run(root, "out_max", {"max_perplexity": limit})
    kept, rejects = _read(res.output), _read(res.rejects)
    assert len(kept) + len(rejects) == 60 and 20 <= len(kept) <= 40
    for d in kept:
        v = d["provenance"][-1]
        assert v["step"] == "lm_score" and v["verdict"] == "keep"
        assert v["score"] == round(model.perplexity(d["text"])[0], 4) <= limit
    for r in rejects:
        v = r["provenance"][-1]
        assert r["reason"] == "max_perplexity" and v["verdict"] == "drop" and v["score"] > limit
    assert not any(d["source"] == "in/c_shuffled.jsonl" for d in kept)
    assert res.totals["steps"]["lm_score"]["seen"] == 60


def test_keep_top_fraction_keeps_the_best_exactly_with_any_worker_count(corpus, model):
    root, texts = corpus
    inputs = {f"in/{name}.jsonl:{n}": t for name, k in (("a_held", "held"), ("b_kjv", "kjv"), ("c_shuffled", "shuffled"))
              for n, t in enumerate(texts[k], 1)}
    expect = {i: round(model.perplexity(t)[0], 4) for i, t in inputs.items()}
    # a copy of the 18th best document, read FIRST (its input is listed first) but with the larger
    # id: the two tie at the cutoff, and the tie goes to the smaller id, not to the first read
    at_cutoff = sorted(expect, key=lambda i: (expect[i], i))[17]
    inputs["zz/tie.jsonl:1"] = inputs[at_cutoff]
    expect["zz/tie.jsonl:1"] = expect[at_cutoff]
    (root / "zz").mkdir(exist_ok=True)
    (root / "zz" / "tie.jsonl").write_text(json.dumps({"text": inputs[at_cutoff]}) + "\n")
    one = _run(root, "out_top1", {"keep_top_fraction": 0.3}, inputs=("zz", "in"))
    two = _run(root, "out_top2", {"keep_top_fraction": 0.3}, workers=2, inputs=("zz", "in"))
    assert one.output.read_bytes() == two.output.read_bytes()
    assert one.rejects.read_bytes() == two.rejects.read_bytes()
    kept, rejects = _read(one.output), _read(one.rejects)
    assert len(kept) == math.floor(0.3 * 61 + 0.5) == 18
    scores = {d["id"]: d["provenance"][-1]["score"] for d in kept + rejects}
    assert scores == expect  # every verdict, kept or dropped, carries the perplexity
    best = sorted(expect, key=lambda i: (expect[i], i))[:18]
    assert sorted(d["id"] for d in kept) == sorted(best)
    assert at_cutoff in best and "zz/tie.jsonl:1" not in best
    assert {r["reason"] for r in rejects} == {"keep_top_fraction"}
    g = one.totals["steps"]["lm_score"]["global"]
    assert g["documents"] == 61 and g["kept"] == 18 and g["cutoff_perplexity"] == expect[at_cutoff]


def test_bad_lm_score_options_are_one_line(corpus):
    root, _ = corpus
    cases = [
        ({}, r"steps\[0\]\.reference = '': is required"),
        ({"reference": "nope.jsonl", "max_perplexity": 10.0}, r"steps\[0\]\.reference = .*does not exist"),
        ({"reference": "default:poe", "max_perplexity": 10.0}, r"steps\[0\]\.reference = 'default:poe': unknown"),
        ({"reference": "ref.jsonl"}, r"steps\[0\]\.max_perplexity = None: set exactly one"),
        ({"reference": "ref.jsonl", "max_perplexity": 10.0, "keep_top_fraction": 0.5}, r"set exactly one"),
        ({"reference": "ref.jsonl", "keep_top_fraction": 1.5}, r"steps\[0\]\.keep_top_fraction = 1.5: must be in"),
        ({"reference": "ref.jsonl", "max_perplexity": 10.0, "order": 0}, r"steps\[0\]\.order = 0: must be 1\.\.10"),
        ({"reference": "ref.jsonl", "max_perplexity": 10.0, "unit": "byte"}, r"steps\[0\]\.unit"),
        ({"reference": "ref.jsonl", "max_perplexity": 10.0, "max_unknown_fraction": 1.0},
         r"steps\[0\]\.max_unknown_fraction = 1\.0: must be in \[0, 1\)"),
    ]
    for options, message in cases:
        data = {"output_dir": "x", "inputs": [{"path": "in"}], "steps": [{"type": "lm_score", **options}]}
        with pytest.raises(ConfigError, match=message) as e:
            parse_pipeline(data, root, "test")
        assert "\n" not in str(e.value)


def test_a_changed_reference_is_not_mixed_into_a_resumed_run(corpus, tmp_path):
    root, texts = corpus
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts["held"][:3]))
    (tmp_path / "ref.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts["ref"][:40]))
    data = {"output_dir": "out", "inputs": [{"path": "in.jsonl"}],
            "steps": [{"type": "lm_score", "reference": "ref.jsonl", "order": 2, "max_perplexity": 1e9}]}
    assert run_pipeline(parse_pipeline(data, tmp_path, "test")).totals["kept"] == 3
    (tmp_path / "ref.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts["ref"][40:80]))
    with pytest.raises(DataError, match="different pipeline or of changed inputs"):
        run_pipeline(parse_pipeline(data, tmp_path, "test"))


def test_a_chinese_reference_trains_a_model_of_characters_not_of_clauses():
    """Chinese has no spaces: a word unit of `\\w+` made each clause one unit, seen once, so UNK,
    and held-out Chinese read no more probable than its characters shuffled."""
    from lmforge.data.corpus import iter_chinese

    texts = [d["text"] for d in iter_chinese()]
    ref, held = texts[:120], texts[200:220]
    shuffled = ["".join(random.Random(i).sample(t, len(t))) for i, t in enumerate(held)]
    zh = train_model(ref, 3, "word", 2)
    assert "的" in zh.codes and len(zh.codes) > 1000
    assert ngram.units("你好，世界。", "word") == ["你", "好", "，", "世", "界", "。"]
    ppl, n = zh.perplexity(held[0])
    assert n >= len([c for c in held[0] if "\u4e00" <= c <= "\u9fff"])  # one unit per character at least
    med_held = statistics.median(zh.perplexity(t)[0] for t in held)
    med_shuffled = statistics.median(zh.perplexity(t)[0] for t in shuffled)
    assert med_held < 0.5 * med_shuffled, (med_held, med_shuffled)


def test_text_the_reference_never_saw_is_not_judged_by_its_perplexity(corpus, model):
    """Chinese against an English reference is a run of UNKs: its perplexity reads lower than held-out
    Shakespeare's, so without `max_unknown_fraction` it ranks first. With it, it is dropped as
    unscorable in both modes and not ranked, and every verdict names the unknown share."""
    from lmforge.data.corpus import iter_chinese

    root, texts = corpus
    zh = [d["text"] for d in iter_chinese()][:10]
    (root / "zh").mkdir(exist_ok=True)
    (root / "zh" / "zh.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in zh))
    held = statistics.median(model.perplexity(t)[0] for t in texts["held"])
    assert all(model.perplexity(t)[0] < held for t in zh)  # what the option is for

    blind = _read(_run(root, "out_zh_blind", {"keep_top_fraction": 0.25}, inputs=("zh", "in")).output)
    assert sum(d["source"] == "zh/zh.jsonl" for d in blind) == 10  # without it: the best quarter is all Chinese

    top = _run(root, "out_zh_top", {"keep_top_fraction": 0.25, "max_unknown_fraction": 0.5}, inputs=("zh", "in"))
    kept, rejects = _read(top.output), _read(top.rejects)
    assert not any(d["source"] == "zh/zh.jsonl" for d in kept) and len(kept) == 15  # a quarter of the 60 ranked
    unscorable = [r for r in rejects if r["reason"] == "max_unknown_fraction"]
    assert sorted(r["source"] for r in unscorable) == ["zh/zh.jsonl"] * 10
    assert all("unknown to the reference" in r["provenance"][-1]["detail"] for r in unscorable)
    g = top.totals["steps"]["lm_score"]["global"]
    assert (g["documents"], g["ranked"], g["kept"], g["unscorable"]) == (70, 60, 15, 10)

    limit = _run(root, "out_zh_max", {"max_perplexity": 1e9, "max_unknown_fraction": 0.5}, inputs=("zh", "in"))
    kept, rejects = _read(limit.output), _read(limit.rejects)
    assert len(kept) == 60 and {r["reason"] for r in rejects} == {"max_unknown_fraction"} and len(rejects) == 10
    for d in kept:  # English: a few percent unknown, and the verdict says how many
        share = model.score(d["text"])[2] / model.score(d["text"])[1]
        assert share < 0.5 and f"{share:.0%} unknown to the reference" in d["provenance"][-1]["detail"]
