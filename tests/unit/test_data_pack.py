"""Pack stage: dtype choice, exact token layout, document-level split, no-op reruns, prepare_data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from lmforge.config import DataConfig, TokenizerConfig
from lmforge.data.errors import DataError
from lmforge.data.pack import pack_corpus, prepare_data, split_documents, token_dtype
from lmforge.data.tokenizer import EOS_TOKEN, TextTokenizer, train_tokenizer

WORDS = "the of and to in that is was he for it with as his on be at by had not but what all were when".split()


def write_corpus(path: Path, n_docs: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 60)))) + (" 你好" if i % 7 == 0 else "")
             for i in range(n_docs)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": str(i), "source": "syn", "locator": str(i), "text": t},
                                       ensure_ascii=False) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    return texts


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    d = tmp_path_factory.mktemp("pack-in")
    texts = write_corpus(d / "corpus.jsonl", 200)
    return d / "corpus.jsonl", train_tokenizer(d / "corpus.jsonl", d / "tokenizer.json", 300), texts


def read_split(out: Path, split: str, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (np.fromfile(out / f"{split}.bin", dtype=dtype), np.load(out / f"{split}.idx.npy"),
            np.load(out / f"{split}.docs.npy"))


def test_token_dtype_boundaries() -> None:
    assert token_dtype(300) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535 all fit
    assert token_dtype(65537) == np.uint32 and token_dtype(200_000) == np.uint32
    with pytest.raises(DataError):
        token_dtype(0)


def test_stored_tokens_are_documents_plus_eos(inputs, tmp_path: Path) -> None:
    corpus, tok_path, texts = inputs
    m = pack_corpus(corpus, tok_path, tmp_path, val_fraction=0.1, seed=3)
    tok = TextTokenizer.from_file(tok_path)
    assert m["dtype"] == "uint16" and m["vocab_size"] == tok.vocab_size and m["eos_id"] == 0
    all_rows = []
    for split in ("train", "val"):
        tokens, offsets, rows = read_split(tmp_path, split, m["dtype"])
        want = np.concatenate([np.array([*tok.encode(texts[r]), tok.eos_id]) for r in rows])
        np.testing.assert_array_equal(tokens, want)
        assert offsets[0] == 0 and offsets[-1] == len(tokens) == m["splits"][split]["tokens"]
        assert len(rows) == len(offsets) - 1 == m["splits"][split]["documents"]
        assert np.all(tokens[offsets[1:] - 1] == tok.eos_id)  # every document ends with eos
        assert (tokens == tok.eos_id).sum() == len(rows)  # and nowhere else
        assert np.all(np.diff(rows) > 0)  # corpus order kept within a split
        all_rows.append(rows)
    train_rows, val_rows = all_rows
    assert len(val_rows) == 20 and not set(train_rows) & set(val_rows)
    assert sorted([*train_rows, *val_rows]) == list(range(200))


def test_split_is_seeded_by_document() -> None:
    a, b, c = split_documents(1000, 0.05, 1), split_documents(1000, 0.05, 1), split_documents(1000, 0.05, 2)
    assert a.sum() == 50 and np.array_equal(a, b) and not np.array_equal(a, c)
    assert split_documents(3, 0.01, 0).sum() == 1  # at least one validation document
    assert split_documents(2, 0.49, 0).sum() == 1  # and at least one for training
    with pytest.raises(DataError, match="at least 2"):
        split_documents(1, 0.1, 0)


def test_rerun_is_noop_and_inputs_change_repacks(inputs, tmp_path: Path) -> None:
    corpus, tok_path, _ = inputs
    first = pack_corpus(corpus, tok_path, tmp_path, 0.1, seed=3)
    stamp = (tmp_path / "train.bin").stat().st_mtime_ns
    val_rows_seed3 = np.load(tmp_path / "val.docs.npy")
    again = pack_corpus(corpus, tok_path, tmp_path, 0.1, seed=3)
    assert not first["skipped"] and again["skipped"]
    assert (tmp_path / "train.bin").stat().st_mtime_ns == stamp
    other = pack_corpus(corpus, tok_path, tmp_path, 0.1, seed=4)
    assert not other["skipped"]
    assert not np.array_equal(np.load(tmp_path / "val.docs.npy"), val_rows_seed3)  # another split
    with open(tmp_path / "val.bin", "ab") as f:  # a damaged shard is noticed and repacked
        f.write(b"\0\0")
    assert not pack_corpus(corpus, tok_path, tmp_path, 0.1, seed=4)["skipped"]
    assert (tmp_path / "val.bin").stat().st_size == other["splits"]["val"]["tokens"] * 2
    assert not list(tmp_path.glob("*.tmp"))


def test_large_vocab_packs_as_uint32(tmp_path: Path) -> None:
    # A vocabulary of 70k where the byte tokens sit above 65535: a uint16 pack would wrap them.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {EOS_TOKEN: 0, **{f"<unused{i}>": i for i in range(1, 70_000)}}
    vocab.update({ch: 70_000 + i for i, ch in enumerate(alphabet)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(tmp_path / "big.json"))
    texts = write_corpus(tmp_path / "corpus.jsonl", 10)
    m = pack_corpus(tmp_path / "corpus.jsonl", tmp_path / "big.json", tmp_path / "out", 0.2, seed=0)
    assert m["dtype"] == "uint32" and m["vocab_size"] == 70_256
    big = TextTokenizer.from_file(tmp_path / "big.json")
    tokens, _, rows = read_split(tmp_path / "out", "train", "uint32")
    assert tokens.max() >= 70_000
    np.testing.assert_array_equal(tokens, np.concatenate([[*big.encode(texts[r]), 0] for r in rows]))


def test_prepare_data_runs_and_skips_each_stage(tmp_path: Path) -> None:
    src = tmp_path / "user.jsonl"
    write_corpus(src, 60)
    with open(src, "a") as f:
        f.write("{broken\n")
    cfg = DataConfig(corpus=str(src), dir=str(tmp_path / "work"), val_fraction=0.1, seed=5)
    logs: list[str] = []
    out = prepare_data(cfg, TokenizerConfig(vocab_size=300, min_frequency=2), log=logs.append)
    assert out == tmp_path / "work"
    assert {p.name for p in out.iterdir()} >= {"corpus.jsonl", "tokenizer.json", "manifest.json", "train.bin",
                                              "val.bin", "train.idx.npy", "val.idx.npy"}
    assert len(logs) == 3 and "1 malformed lines skipped" in logs[0]
    assert "trained" in logs[1] and "packed" in logs[2] and "6 docs" in logs[2]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["documents"] == 54 and manifest["seed"] == 5
    logs.clear()
    prepare_data(cfg, TokenizerConfig(vocab_size=300, min_frequency=2), log=logs.append)
    assert all("up to date" in line for line in logs), logs
    logs.clear()
    prepare_data(cfg, TokenizerConfig(vocab_size=280, min_frequency=2), log=logs.append)
    assert "up to date" in logs[0] and "trained" in logs[1] and "packed" in logs[2]


def test_pack_missing_inputs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="corpus file .* does not exist"):
        pack_corpus(tmp_path / "c.jsonl", tmp_path / "t.json", tmp_path / "o", 0.1, 0)
