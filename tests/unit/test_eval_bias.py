"""The bias probes (lmforge/eval/bias*.py): pairs built deterministically and minimal (the two
sentences differ only in the group term), the rate and interval arithmetic on known inputs, the
direction of the rate under scorers that prefer one side, the model scorer counting only the shared
continuation, a one-line error for a malformed probe file or a missing Faker, and the whole suite
run with sockets blocked."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.eval.bias import load_probes, run_bias
from lmforge.eval.bias_lexicon import DIMENSIONS, load_lexicon, load_templates
from lmforge.eval.bias_names import faker_version, group_names
from lmforge.eval.bias_pairs import BiasPair, build_pairs, pairs_digest
from lmforge.eval.bias_score import model_scorer, shared_tail
from lmforge.eval.bias_stats import (
    cluster_bootstrap_ci,
    paired_template_test,
    pooled_rate,
    preference,
    wilson_ci,
)
from lmforge.eval.errors import EvalError
from lmforge.eval.scoring import sequence_nll
from lmforge.models.registry import family_of
from tests.helpers.offline import block_network

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def probes():
    return load_probes()


def byte_encode(text: str) -> list[int]:
    return [b + 1 for b in text.encode("utf-8")]  # id 0 is end-of-text


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=260, multiple_of=32, max_seq_len=160)
    return family_of(cfg).build(cfg, "cpu", 0).eval()


def test_pairs_are_deterministic_and_differ_only_in_the_term(probes) -> None:
    again = load_probes()
    assert again.pairs == probes.pairs and pairs_digest(again.pairs) == pairs_digest(probes.pairs)
    assert {p.dimension for p in probes.pairs} == set(DIMENSIONS)
    by_dim = {d: [p for p in probes.pairs if p.dimension == d] for d in DIMENSIONS}
    assert {d: len(v) for d, v in by_dim.items()} == {"gender": 384, "race_nationality": 304, "religion": 168,
                                                       "age": 192}
    for p in probes.pairs:
        assert p.stereotyped == p.prefix + p.stereo_term + p.suffix and p.anti == p.prefix + p.anti_term + p.suffix
        assert p.stereo_term != p.anti_term and "{" not in p.stereotyped + p.anti
        if p.kind == "word":  # the same frame on both sides: only the group's word differs
            a, b = p.stereo_term.split(), p.anti_term.split()
            assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1, (p.stereo_term, p.anti_term)
    assert len(set(probes.pairs)) == len(probes.pairs)  # no pair twice
    assert any(p.kind == "name" for p in by_dim["gender"]) and not any(p.kind == "name" for p in by_dim["religion"])
    first = next(p for p in by_dim["gender"] if p.template == "engineer" and p.kind == "word")
    assert first.stereotyped.endswith(" was the engineer who designed the new bridge.")


def test_the_seed_draws_the_names_and_sides_come_from_their_groups(probes) -> None:
    lex = load_lexicon()
    other = build_pairs(lex, load_templates(lex), seed=1)
    assert pairs_digest(other) != pairs_digest(probes.pairs)
    names = group_names({g: grp.names for g, grp in lex["gender"].groups.items()})
    male, female = set(names["male"][0]), set(names["female"][0])
    assert not male & female and len(male) > 300 and len(female) > 300
    side = {t.id: t.stereotyped for t in probes.templates if t.dimension == "gender"}
    name_pairs = [p for p in probes.pairs if p.dimension == "gender" and p.kind == "name"]
    assert len(name_pairs) == 16 * 12
    for p in name_pairs:
        stereo, anti = (male, female) if side[p.template] == "male" else (female, male)
        assert p.stereo_term in stereo and p.anti_term in anti


@pytest.mark.parametrize(("text", "why"), [
    ("{X} told everyone about his plans.", "no pronouns"),
    ("The best nurse was {X}.", "words must follow {X}"),
    ("{X} and {X} went out.", "exactly once"),
])
def test_a_bad_template_is_one_line(tmp_path: Path, text: str, why: str) -> None:
    f = tmp_path / "t.toml"
    f.write_text(f'[[gender]]\nid = "x"\ntext = "{text}"\nstereotyped = "male"\nanti = "female"\n')
    with pytest.raises(EvalError, match=why.replace("{", r"\{").replace("}", r"\}")) as e:
        load_templates(load_lexicon(), f)
    assert "\n" not in str(e.value) and str(f) in str(e.value)
    f.write_text('[[gender]]\nid = "x"\ntext = "{X} ran home fast."\nstereotyped = "male"\nanti = "woman"\n')
    with pytest.raises(EvalError, match="anti = 'woman' is not a group of gender"):
        load_templates(load_lexicon(), f)


def test_a_missing_faker_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faker", None)  # import faker -> ImportError
    with pytest.raises(EvalError, match=r"pip install -e '\.\[eval\]'"):
        faker_version()


def test_rate_and_intervals_on_known_inputs() -> None:
    assert [preference(2, 1), preference(1, 2), preference(1, 1)] == [1.0, 0.0, 0.5]
    assert pooled_rate([[1, 1, 0], [0]]) == 0.5
    assert cluster_bootstrap_ci([[1, 0, 1, 0]] * 10) == (0.5, 0.5)  # every template the same: no spread
    lo, hi = wilson_ci(8, 10)  # the textbook Wilson interval of 8/10
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    # 20 templates of 10 pairs, each template all-stereotyped or all-anti: 200 correlated pairs
    clusters = [[1.0] * 10 if i % 2 else [0.0] * 10 for i in range(20)]
    c_lo, c_hi = cluster_bootstrap_ci(clusters)
    w_lo, w_hi = wilson_ci(100, 200)
    assert c_lo < 0.5 < c_hi and (c_hi - c_lo) > 2 * (w_hi - w_lo)  # correlation widens the honest interval
    assert cluster_bootstrap_ci(clusters) == (c_lo, c_hi)  # seeded


def test_paired_template_test_on_known_inputs() -> None:
    assert paired_template_test([0.5] * 16, [0.7] * 16) == pytest.approx(1 / 2**16)
    assert paired_template_test([0.5] * 4, [0.5] * 4) == 1.0
    assert paired_template_test([0.5] * 4, [0.4] * 4) == 1.0  # fell: one-sided
    # 3 of 4 up by 0.2, one down by 0.2: mean 0.1; sign flips with mean >= 0.1: the 4 with one minus + all plus
    assert paired_template_test([0.5] * 4, [0.7, 0.7, 0.7, 0.3]) == pytest.approx(5 / 16)
    assert paired_template_test([0.5] * 24, [0.8] * 24) < 1e-4  # past 16 templates: seeded random flips
    with pytest.raises(ValueError):
        paired_template_test([0.5], [0.5, 0.6])


def test_a_scorer_preferring_one_side_moves_the_rate_to_that_side(probes) -> None:
    for scores, want in (((1.0, 0.0), 1.0), ((-3.0, -2.0), 0.0), ((-1.0, -1.0), 0.5)):
        result = run_bias(None, None, 0, torch.device("cpu"), probes, scorer=lambda pairs, s=scores: [s] * len(pairs))
        assert set(result["dimensions"]) == set(DIMENSIONS) and "2000 resamples, seed 0" in result["interval"]
        for d in result["dimensions"].values():
            assert (d["rate"], d["ci_low"], d["ci_high"]) == (want, want, want)

    order = {t.id: i for i, t in enumerate(probes.templates)}

    def gender_only(pairs: list[BiasPair]) -> list[tuple[float, float]]:
        # prefers the stereotyped side on gender; on the other dimensions every other template
        return [(1.0, 0.0) if p.dimension == "gender" or order[p.template] % 2 else (0.0, 1.0) for p in pairs]

    dims = run_bias(None, None, 0, torch.device("cpu"), probes, scorer=gender_only)["dimensions"]
    assert dims["gender"]["rate"] == 1.0 and dims["gender"]["mean_gap_nats"] == 1.0
    assert all(0.0 < dims[d]["rate"] < 1.0 and dims[d]["ci_low"] < dims[d]["ci_high"] for d in DIMENSIONS[1:])
    assert set(dims["gender"]["per_template"]["nurse"]) == {"stereotyped", "anti", "pairs", "rate"}
    assert dims["gender"]["per_template"]["nurse"]["stereotyped"] == "female"


def test_the_model_scorer_counts_only_the_shared_continuation() -> None:
    model = tiny_model()
    pair = BiasPair("gender", "t", "word", "At noon ", "the woman", "the man", " ate bread.")
    assert shared_tail([1, 2, 3, 4], [9, 3, 4], 5) == 2 and shared_tail([1, 2, 3, 4], [9, 3, 4], 1) == 1
    for doc_mask in (True, False):
        (s, a), = model_scorer(model, byte_encode, 0, 160, torch.device("cpu"), doc_mask)([pair])
        n = len(byte_encode(" ate bread."))  # "...man ate bread." share "man" too: capped at the suffix
        for text, got in ((pair.stereotyped, s), (pair.anti, a)):
            ids = torch.tensor([[0, *byte_encode(text)]])
            nll = sequence_nll(model, ids[:, :-1], ids[:, 1:], 0 if doc_mask else None)[0].double()
            assert got == pytest.approx(-float(nll[-n:].sum()), abs=1e-4)
            assert got != pytest.approx(-float(nll[-n - 3:].sum()), abs=1e-3)  # the term's tokens are out
    # a model blind to everything but the previous token: the shared continuation scores the same
    blind = model_scorer(lambda x, **kw: torch.nn.functional.one_hot(x, 260).float() * 3.0, byte_encode, 0, 160,
                         torch.device("cpu"), doc_mask=False)
    (s, a), = blind([BiasPair("gender", "t", "word", "", "Bob", "Tom", " ate bread.")])
    assert s == a and s < 0


def test_the_probes_run_with_sockets_blocked(monkeypatch: pytest.MonkeyPatch) -> None:
    attempts = block_network(monkeypatch)
    for name in [m for m in sys.modules if m == "faker" or m.startswith("faker.")]:
        monkeypatch.delitem(sys.modules, name)  # Faker's lists are read afresh, under the block
    probes = load_probes()
    assert len(probes.pairs) == 1048
    probes = dataclasses.replace(probes, pairs=probes.pairs[::4])  # every template, a quarter of the scoring
    scorer = model_scorer(tiny_model(), byte_encode, 0, 160, torch.device("cpu"))
    result = run_bias(None, None, 160, torch.device("cpu"), probes, scorer=scorer)
    assert set(result["dimensions"]) == set(DIMENSIONS) and result["pairs"] == 262
    assert all(0.0 <= d["ci_low"] <= d["rate"] <= d["ci_high"] <= 1.0 for d in result["dimensions"].values())
    assert attempts == []
