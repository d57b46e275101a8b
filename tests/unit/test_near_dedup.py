"""Near-duplicate detection: injected near-duplicates in Shakespeare passages are found (recall,
precision against Jaccard computed here with plain Python sets), LSH candidates below the threshold
are rejected by verification, results do not depend on order or process, config errors are one line."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest

from lmforge.config import ConfigError
from lmforge.data.corpus import iter_shakespeare
from lmforge.data.dup_injection import edit_down_to, passages, true_jaccard, word_shingles
from lmforge.data.errors import DataError
from lmforge.data.near_dedup import (
    NearDedupConfig,
    find_near_duplicates,
    jaccard,
    minhash_signatures,
    permutations,
    shingle_hash_sets,
    shingle_hashes,
)

NGRAM = 5


def _shingles(words: list[str]) -> set[tuple[str, ...]]:
    """The reference shingle set, independent of near_dedup.py: word 5-grams of lower-cased \\w+."""
    return word_shingles(words, NGRAM)


def _true_jaccard(x: list[str], y: list[str]) -> float:
    return true_jaccard(x, y, NGRAM)


def _passages(n: int) -> list[list[str]]:
    """n passages of 100-300 words cut from the embedded Shakespeare corpus."""
    return passages((doc["text"] for doc in iter_shakespeare()), limit=n)


def _edit_down_to(words: list[str], target: float, rng: random.Random, vocab: list[str]) -> list[str]:
    """Substitute or delete random words until the true Jaccard with the original is <= target."""
    return edit_down_to(words, target, rng, vocab, NGRAM)


@pytest.fixture(scope="module")
def injected() -> tuple[list[tuple[str, str]], dict[str, tuple[str, float]]]:
    base = _passages(300)
    assert len(base) == 300
    rng = random.Random(12)
    vocab = sorted({w for p in base for w in p})
    docs = [(f"p{i:04d}", " ".join(p)) for i, p in enumerate(base)]
    truth: dict[str, tuple[str, float]] = {}  # copy id -> (original id, true Jaccard)
    levels = [0.95, 0.9, 0.85, 0.68]
    for i, p in enumerate(base[:240]):
        target = levels[i % len(levels)]
        copy = _edit_down_to(p, target, rng, vocab)
        cid = f"p{i:04d}~{int(target * 100)}"  # sorts after its original: the original is kept
        docs.append((cid, " ".join(copy)))
        truth[cid] = (f"p{i:04d}", _true_jaccard(p, copy))
    rng.shuffle(docs)
    return docs, truth


def test_injected_near_duplicates_recall_and_precision(injected) -> None:
    docs, truth = injected
    cfg = NearDedupConfig(threshold=0.8)
    res = find_near_duplicates(docs, cfg)
    positives = {c for c, (_, s) in truth.items() if s >= cfg.threshold}
    negatives = {c for c, (_, s) in truth.items() if s < cfg.threshold}
    assert len(positives) >= 170 and len(positives) + len(negatives) == 240  # levels landed as meant
    assert sum(0.6 <= truth[c][1] <= 0.7 for c in negatives) == 60
    dropped = set(res.duplicate_of)
    recall = len(dropped & positives) / len(positives)
    precision = len(dropped & positives) / max(1, len(dropped))
    print(f"near-dedup: recall {recall:.3f} precision {precision:.3f} dropped {len(dropped)} "
          f"candidates {res.candidates} verified {res.verified} rejected {res.rejected_candidates}")
    assert recall >= 0.95
    assert precision >= 0.99
    assert not dropped & negatives  # ~0.6-0.7 copies are never removed
    for c in dropped & positives:
        orig, s = truth[c]
        assert res.duplicate_of[c] == orig
        assert res.similarity[c] == pytest.approx(s, abs=1e-12)  # verification is exact Jaccard
    assert res.kept == len(docs) - len(dropped)
    assert res.verified >= len(dropped) and res.candidates == res.verified + res.rejected_candidates


def test_lsh_candidate_below_threshold_is_rejected() -> None:
    words = _passages(1)[0][:200]
    rng = random.Random(3)
    half = _edit_down_to(words, 0.5, rng, ["zzz", "qqq", "xxx", "www"])
    s = _true_jaccard(words, half)
    assert 0.4 < s <= 0.5
    # one row per band: any single matching permutation makes a candidate (p = 1 - (1 - s)^32)
    loose = NearDedupConfig(num_perm=32, bands=32, threshold=0.8)
    res = find_near_duplicates([("a", " ".join(words)), ("b", " ".join(half))], loose)
    assert res.candidates == 1 and res.rejected_candidates == 1 and res.verified == 0
    assert res.duplicate_of == {} and res.similarity == {}
    # the same pair at a threshold it reaches is merged: the rejection above came from verification
    res = find_near_duplicates([("a", " ".join(words)), ("b", " ".join(half))],
                               NearDedupConfig(num_perm=32, bands=32, threshold=0.4))
    assert res.duplicate_of == {"b": "a"} and res.similarity["b"] == pytest.approx(s)


def test_clusters_keep_smallest_id_and_chains_are_counted() -> None:
    words = _passages(1)[0][:200]
    rng = random.Random(5)
    b = _edit_down_to(words, 0.85, rng, ["zzz"])
    c = _edit_down_to(b, 0.85, rng, ["qqq"])
    assert _true_jaccard(words, c) < 0.8  # a ~ b ~ c, but a !~ c
    cfg = NearDedupConfig(num_perm=64, bands=32)  # rows = 2: every pair above is a candidate
    res = find_near_duplicates([("m", " ".join(c)), ("k", " ".join(b)), ("z", " ".join(words))], cfg)
    assert res.duplicate_of == {"m": "k", "z": "k"}  # b has the smallest id: kept
    assert res.chained == 0
    res = find_near_duplicates([("c", " ".join(c)), ("b", " ".join(b)), ("a", " ".join(words))], cfg)
    assert res.duplicate_of == {"b": "a", "c": "a"}
    assert res.chained == 1 and res.similarity["c"] < 0.8 <= res.similarity["b"]


def test_order_and_runs_do_not_change_the_result(injected) -> None:
    docs, _ = injected
    cfg = NearDedupConfig()
    first = find_near_duplicates(docs, cfg)
    again = find_near_duplicates(iter(docs), cfg)
    reordered = find_near_duplicates(sorted(docs, reverse=True), cfg)
    assert first == again == reordered
    assert list(first.duplicate_of) == sorted(first.duplicate_of)


def test_hashes_are_stable_across_processes() -> None:
    code = ("from lmforge.data.near_dedup import *; c = NearDedupConfig(shingle='char'); "
            "a, b = permutations(c); print(minhash_signatures([shingle_hashes('Hello world, again', c), "
            "shingle_hashes('To be or not to be', NearDedupConfig())], a, b).sum(axis=1).tolist())")
    outs = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                check=True).stdout)
    assert len(outs) == 1


def test_minhash_estimates_jaccard_and_is_exact_mod_2_32() -> None:
    cfg = NearDedupConfig(num_perm=256, bands=32)
    words = _passages(1)[0][:300]
    other = _edit_down_to(words, 0.6, random.Random(1), ["zzz", "yyy"])
    x, y = shingle_hashes(" ".join(words), cfg), shingle_hashes(" ".join(other), cfg)
    a, b = permutations(cfg)
    sig = minhash_signatures([x, y], a, b)
    assert abs((sig[0] == sig[1]).mean() - jaccard(x, y)) < 0.1
    m = 1 << 32
    ref = [min((int(a[k]) * (int(v) % m) + int(b[k])) % m for v in x) for k in range(8)]
    assert sig[0, :8].tolist() == ref  # numpy uint32 wrapping arithmetic == Python big-int arithmetic
    assert all(int(v) % 2 == 1 for v in a)  # odd multipliers: each h_k is a bijection of 32-bit values
    assert jaccard(x, y) == pytest.approx(_true_jaccard(words, other))


def test_char_shingles_and_short_or_empty_documents() -> None:
    cfg = NearDedupConfig(shingle="char", ngram=4, threshold=0.7)
    res = find_near_duplicates([("a", "The cat sat on the mat today"), ("b", "the cat  sat on the mat today!"),
                                ("c", ""), ("d", "   "), ("e", "hi")], cfg)
    assert res.duplicate_of == {"b": "a"} and res.empty == 2
    assert len(shingle_hashes("hi", cfg)) == 1  # shorter than one shingle: one shingle
    assert len(np.unique(shingle_hashes("ab ab ab", NearDedupConfig(ngram=1)))) == 1


@pytest.mark.parametrize("cfg", [NearDedupConfig(), NearDedupConfig(shingle="char", ngram=7)])
def test_batched_shingle_sets_equal_per_document_sets(cfg) -> None:
    texts = [" ".join(p) for p in _passages(20)] + ["", "a b", "One two three four five", "   ", "xyz"]
    random.Random(0).shuffle(texts)
    batch = shingle_hash_sets(texts, cfg)
    for t, got in zip(texts, batch):
        assert np.array_equal(got, shingle_hashes(t, cfg))
    words = re.findall(r"\w+", texts[0])
    if cfg.shingle == "word" and len(words) > NGRAM:
        assert len(batch[0]) == len(_shingles(words))


def test_exact_copies_skip_lsh_and_join_the_cluster() -> None:
    words = _passages(1)[0][:150]
    near = _edit_down_to(words, 0.9, random.Random(2), ["zzz"])
    text = " ".join(words)
    docs = [(f"c{i:03d}", text) for i in range(1, 200)] + [("n", " ".join(near)), ("c000", text.upper())]
    for order in (docs, docs[::-1]):
        res = find_near_duplicates(order, NearDedupConfig())
        assert res.exact == 199 and res.candidates == res.verified == 1  # not 200 * 199 / 2
        assert res.duplicate_of == {**{f"c{i:03d}": "c000" for i in range(1, 200)}, "n": "c000"}
        assert res.similarity["c001"] == 1.0 and res.similarity["n"] == pytest.approx(_true_jaccard(words, near))


def test_duplicate_ids_are_refused() -> None:
    with pytest.raises(DataError, match="appears twice"):
        find_near_duplicates([("a", "x y"), ("a", "x y")])


@pytest.mark.parametrize("kw,key", [
    ({"shingle": "token"}, "near_dedup.shingle"),
    ({"ngram": 0}, "near_dedup.ngram"),
    ({"num_perm": 100, "bands": 16}, "near_dedup.bands"),
    ({"bands": 256}, "near_dedup.bands"),
    ({"threshold": 0.0}, "near_dedup.threshold"),
    ({"threshold": 1.5}, "near_dedup.threshold"),
    ({"seed": -1}, "near_dedup.seed"),
    ({"num_perm": 1.5}, "near_dedup.num_perm"),
])
def test_config_errors_are_one_line(kw, key) -> None:
    with pytest.raises(ConfigError) as e:
        NearDedupConfig(**kw)
    assert "\n" not in str(e.value) and key in str(e.value)
    assert NearDedupConfig(num_perm=100, bands=20).rows == 5


def test_word_shingles_split_words_like_re_findall() -> None:
    """Words are found by a code-point table in numpy (shingles.py), not by a regex per text: they
    must still be exactly `re.findall(r"\\w+", text.lower())`, non-ASCII and astral letters included."""
    texts = ["Straße, naïve café_au-lait 42x; ÉCOLE école", "𝐀𝐁 🙂 x𝐀 Ǆemal ǆemal", "  ", "a--b__c\td\u2003e",
             "İstanbul ıi", "\ud800 lone surrogate"]
    one = NearDedupConfig(ngram=1)
    for t in texts:
        words = re.findall(r"\w+", t.lower())
        assert len(shingle_hashes(t, one)) == len(set(words)), t
        # same words, other separators: the same set
        assert np.array_equal(shingle_hashes(t, one), shingle_hashes(" / ".join(words), one)), t
    assert not np.array_equal(shingle_hashes("ab cd", one), shingle_hashes("ba dc", one))


def test_signatures_do_not_depend_on_batching_or_chunk_edges() -> None:
    """minhash_signatures works on chunks of 1,024 shingles: a document cut by a chunk edge (or
    bigger than a chunk) must get the same signature as when it is alone."""
    rng = np.random.default_rng(0)
    sets = [np.unique(rng.integers(0, 2**63, size=k, dtype=np.uint64)) for k in (3000, 5, 0, 1500, 1, 700)]
    a, b = permutations(NearDedupConfig())
    together = minhash_signatures(sets, a, b)
    for s, row in zip(sets, together):
        assert np.array_equal(row, minhash_signatures([s], a, b)[0])
    m = 1 << 32
    ref = [min((int(a[k]) * (int(v) % m) + int(b[k])) % m for v in sets[0]) for k in range(4)]
    assert together[0, :4].tolist() == ref and (together[2] == m - 1).all()  # empty set: all-max
