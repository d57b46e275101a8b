"""Tokenizer stage: byte-level BPE training, exact round trip, eos handling, skip-when-current."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from lmforge.data.errors import DataError
from lmforge.data.tokenizer import EOS_TOKEN, TextTokenizer, tokenizer_is_current, train_tokenizer

TEXTS = [
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void; and darkness was upon the face of the deep.",
    "Now is the winter of our discontent made glorious summer by this sun of York;",
] * 30


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tok")
    corpus = d / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    return corpus, train_tokenizer(corpus, d / "tokenizer.json", vocab_size=400, min_frequency=2)


ROUND_TRIP = [
    "", "a", "To be, or not to be", "  leading and trailing spaces  ", "tabs\tand\nnew\r\nlines\n\n",
    "你好，世界！机器学习", "Ünïcödé — “quotes” … ½ € ∑", "emoji 🤖🚀 and ZWJ 👩‍💻", "\x00\x01 control",
    "العربية עברית русский", f"literal {EOS_TOKEN} in text", "<|endoftext", "   ",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_is_exact(trained, text: str) -> None:
    tok = TextTokenizer.from_file(trained[1])
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_round_trip_random_unicode(trained) -> None:
    tok = TextTokenizer.from_file(trained[1])
    rng = random.Random(0)
    planes = [(0x20, 0x7E), (0xA0, 0x24F), (0x400, 0x4FF), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF), (0, 0x1F)]
    for _ in range(50):
        lo, hi = rng.choice(planes)
        text = "".join(chr(rng.randint(lo, hi)) if rng.random() < 0.8 else rng.choice(" \n\t")
                       for _ in range(rng.randint(1, 60)))
        assert tok.decode(tok.encode(text)) == text, repr(text)


def test_trained_vocab_and_eos(trained) -> None:
    tok = TextTokenizer.from_file(trained[1])
    assert tok.eos_id == 0 and tok.decode([0]) == EOS_TOKEN
    assert 257 < tok.vocab_size <= 400  # eos + 256 bytes + learnt merges
    # merges were learnt: a frequent word is fewer tokens than bytes
    assert len(tok.encode(" the earth")) < len(b" the earth")
    # text that spells the special token is text: data cannot inject a document boundary
    assert 0 not in tok.encode(f"a{EOS_TOKEN}b")


def test_encode_batch_matches_encode(trained) -> None:
    tok = TextTokenizer.from_file(trained[1])
    assert tok.encode_batch(ROUND_TRIP) == [tok.encode(t) for t in ROUND_TRIP]


def test_training_is_deterministic_and_skippable(trained, tmp_path: Path) -> None:
    corpus, first = trained
    again = train_tokenizer(corpus, tmp_path / "tokenizer.json", vocab_size=400, min_frequency=2)
    assert again.read_bytes() == first.read_bytes()
    assert tokenizer_is_current(corpus, again, 400, 2)
    assert not tokenizer_is_current(corpus, again, 512, 2)
    assert not tokenizer_is_current(corpus, again, 400, 1)
    again.write_text(again.read_text().replace('"<|endoftext|>"', '"<|eot|>"'))  # damaged output
    assert not tokenizer_is_current(corpus, again, 400, 2)


def test_errors_are_one_line(tmp_path: Path, trained) -> None:
    with pytest.raises(DataError, match="does not exist"):
        TextTokenizer.from_file(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not a valid tokenizers JSON"):
        TextTokenizer.from_file(bad)
    with pytest.raises(DataError, match=re.escape("no '<|eos|>' token")):
        TextTokenizer.from_file(trained[1], eos_token="<|eos|>")
    with pytest.raises(DataError, match="vocab_size"):
        train_tokenizer(trained[0], tmp_path / "t.json", vocab_size=100)
