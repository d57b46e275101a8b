"""Erasure-coded shards: any m of k + m pieces lost or corrupt and the loader still reads the same
tokens; more than m is one clear error; repair restores the exact pieces; verify finds bad ones."""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from lmforge.config import ConfigError, DataConfig, TokenizerConfig
from lmforge.data import erasure
from lmforge.data.errors import DataError
from lmforge.data.loader import DistributedTokenLoader, TokenDataset
from lmforge.data.pack import pack_corpus, prepare_data
from lmforge.data.tokenizer import train_tokenizer
from lmforge.data.verify import verify_command, verify_pack

K, M = 4, 2
STRIPE = 64  # bytes per piece per coding step: small, so a tiny pack still spans many stripes
SEQ = 16
WORDS = "the of and to in that is was he for it with as his on be at by had not but what all".split()
PIECES = erasure.piece_names("train.bin", K + M)


def write_corpus(path: Path, n_docs: int) -> None:
    rng = np.random.default_rng(0)
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS, size=int(rng.integers(5, 60))))}) + "\n"
                            for _ in range(n_docs)), encoding="utf-8")


@pytest.fixture(scope="module")
def packs(tmp_path_factory) -> tuple[Path, Path]:
    """(plain pack, the same corpus packed with 4 + 2 erasure pieces)."""
    d = tmp_path_factory.mktemp("ec")
    write_corpus(d / "corpus.jsonl", 120)
    tok = train_tokenizer(d / "corpus.jsonl", d / "tokenizer.json", 300)
    pack_corpus(d / "corpus.jsonl", tok, d / "plain", 0.1, seed=1)
    pack_corpus(d / "corpus.jsonl", tok, d / "coded", 0.1, seed=1, erasure=(K, M), stripe=STRIPE)
    return d / "plain", d / "coded"


@pytest.fixture(scope="module")
def reference(packs) -> dict[str, np.ndarray]:
    plain, _ = packs
    return {split: np.fromfile(plain / f"{split}.bin", dtype=np.uint16) for split in ("train", "val")}


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def files_of(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def corrupt(path: Path) -> None:
    """Flip bytes at the start, middle and end; same size (an in-place overwrite)."""
    data = bytearray(path.read_bytes())
    for at in (0, len(data) // 2, len(data) - 1):
        data[at] ^= 0x5A
    path.write_bytes(bytes(data))


def damage(d: Path, pieces: tuple[int, ...], how: str) -> None:
    for i in pieces:
        p = d / PIECES[i]
        p.unlink() if how == "delete" else corrupt(p)


def assert_reads_like(d: Path, reference: dict[str, np.ndarray]) -> None:
    """Every token of both splits, every window, and loader batches equal the plain pack's."""
    for split, want in reference.items():
        ds = TokenDataset(d, split)
        np.testing.assert_array_equal(ds.tokens[0:len(ds)], want)
        for w in range(ds.n_windows(SEQ)):
            np.testing.assert_array_equal(ds.window(w, SEQ), want[w * SEQ:w * SEQ + SEQ + 1])
    # the prefetch thread is on: stripes are decoded on two threads
    loader = DistributedTokenLoader(TokenDataset(d, "train"), SEQ, 3, seed=5)
    windows = [np.stack([reference["train"][w * SEQ:w * SEQ + SEQ + 1] for w in loader.window_indices(p, 3)])
               for p in range(0, 3 * 8, 3)]
    for want in windows:
        x, y = loader.next_batch()
        np.testing.assert_array_equal(x.numpy(), want[:, :-1])
        np.testing.assert_array_equal(y.numpy(), want[:, 1:])
    loader.close()


def test_coded_pack_layout(packs, reference) -> None:
    plain, coded = packs
    names = {p.name for p in coded.iterdir()}
    assert "train.bin" not in names and "val.bin" not in names  # the pieces replace the plain files
    assert set(PIECES) | {"train.bin.ec.json"} <= names
    m = json.loads((coded / "manifest.json").read_text())
    assert m["splits"]["train"]["erasure"] == {"k": K, "m": M}
    assert set(PIECES) <= set(m["files"]) and "train.bin" not in m["files"]
    plain_m = json.loads((plain / "manifest.json").read_text())
    assert m["splits"]["train"]["sha256"] == plain_m["splits"]["train"]["sha256"]
    side = json.loads((coded / "train.bin.ec.json").read_text())
    assert (side["k"], side["m"], side["stripe"]) == (K, M, STRIPE)
    assert side["length"] == reference["train"].nbytes and side["piece_length"] * K >= side["length"]
    assert side["piece_length"] > 10 * STRIPE  # many stripes
    # data piece j is the j-th slice of the token file: intact ones are read in place
    raw = reference["train"].tobytes()
    assert (coded / PIECES[1]).read_bytes() == raw[side["piece_length"]:2 * side["piece_length"]]
    assert verify_pack(coded, deep=True) == [] and verify_pack(coded) == []


@pytest.mark.parametrize("how", ["delete", "corrupt"])
def test_any_m_bad_pieces_read_identical_tokens(packs, reference, how, tmp_path: Path, caplog) -> None:
    _, coded = packs
    combos = [c for r in (1, 2) for c in itertools.combinations(range(K + M), r)]
    assert len(combos) == 6 + 15
    for n, bad in enumerate(combos):
        d = copy_of(coded, tmp_path / f"c{n}")
        damage(d, bad, how)
        before = files_of(d)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="lmforge.data.loader"):
            TokenDataset(d, "train")
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1 and "\n" not in lines[0], lines  # one line per opened split
        assert "train split" in lines[0] and "rebuilt in memory" in lines[0]
        assert all(PIECES[i] in lines[0] for i in bad) and sum(p in lines[0] for p in PIECES) == len(bad)
        assert_reads_like(d, reference)
        assert files_of(d) == before  # the reader wrote nothing
        shutil.rmtree(d)


def test_more_than_m_bad_pieces_is_one_line_error(packs, tmp_path: Path) -> None:
    _, coded = packs
    d = copy_of(coded, tmp_path / "c")
    damage(d, (0,), "delete")
    damage(d, (3, 5), "corrupt")
    with pytest.raises(DataError) as e:
        TokenDataset(d, "train")
    msg = str(e.value)
    assert "\n" not in msg and "train.bin" in msg and "3 of its 6" in msg and "needs 4 good pieces" in msg
    assert all(PIECES[i] in msg for i in (0, 3, 5)) and "only 3 are left" in msg
    TokenDataset(d, "val")  # the other split is intact
    code_lines: list[str] = []
    assert verify_command([str(d)], repair=True, out=code_lines.append, err=code_lines.append) == 1
    assert len(code_lines) == 1 and "INVALID" in code_lines[0] and "needs 4" in code_lines[0]


def test_piece_hashes_are_checked_even_when_the_data_would_decode(packs, reference, tmp_path: Path,
                                                                  caplog) -> None:
    """A corrupt data piece of the right size would be served as is without its hash; a corrupt
    parity piece is not needed to decode, yet it is reported."""
    _, coded = packs
    d = copy_of(coded, tmp_path / "c")
    corrupt(d / PIECES[1])
    corrupt(d / PIECES[K])  # parity
    lay = erasure.read_layout(d / "train.bin")
    assert set(erasure.check_pieces(d / "train.bin", lay)) == {1, K}
    with caplog.at_level(logging.WARNING, logger="lmforge.data.loader"):
        ds = TokenDataset(d, "train")
    assert PIECES[1] in caplog.text and PIECES[K] in caplog.text and "corrupt" in caplog.text
    np.testing.assert_array_equal(ds.tokens[0:len(ds)], reference["train"])
    # a corruption that keeps size and mtime passes the cheap open check, not the deep verify
    d2 = copy_of(coded, tmp_path / "c2")
    st = (d2 / PIECES[2]).stat()
    corrupt(d2 / PIECES[2])
    os.utime(d2 / PIECES[2], ns=(st.st_atime_ns, st.st_mtime_ns))
    problems = verify_pack(d2, deep=True)
    assert len(problems) == 1 and PIECES[2] in problems[0] and "--repair" in problems[0]


def test_verify_reports_and_repair_restores_identical_pieces(packs, reference, tmp_path: Path, caplog) -> None:
    _, coded = packs
    d = copy_of(coded, tmp_path / "c")
    good = files_of(coded)
    damage(d, (0,), "delete")
    damage(d, (4,), "corrupt")
    before = files_of(d)
    out: list[str] = []
    assert verify_command([str(d)], out=out.append, err=out.append) == 1
    assert len(out) == 1 and "INVALID" in out[0] and PIECES[0] in out[0] and "(+1 more)" in out[0]
    assert files_of(d) == before  # verify without --repair never writes
    out.clear()
    assert verify_command([str(d)], repair=True, out=out.append, err=out.append) == 0
    assert out == [f"{d}: rebuilt {PIECES[0]}, {PIECES[4]} from the other erasure pieces", f"{d}: ok"]
    after = files_of(d)
    assert all(after[name] == good[name] for name in good if name != "manifest.json")  # byte-identical pieces
    assert not list(d.glob("*.tmp"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lmforge.data.loader"):
        assert_reads_like(d, reference)
    assert not caplog.records  # nothing left to rebuild
    m = json.loads((d / "manifest.json").read_text())  # re-fingerprinted: opening needs no re-hash
    assert m["files"][PIECES[0]]["mtime_ns"] == (d / PIECES[0]).stat().st_mtime_ns
    assert verify_command([str(d)], repair=True, out=out.append, err=out.append) == 0


def test_file_level_roundtrip_every_two_lost(tmp_path: Path) -> None:
    """erasure.py on its own: odd lengths (padding), several stripes, every pair of pieces lost."""
    for length in (0, 1, 37, 1000):
        data = np.random.default_rng(length).integers(0, 256, length, dtype=np.uint8).tobytes()
        src = tmp_path / f"f{length}"
        src.write_bytes(data)
        lay = erasure.encode_file(src, 3, 2, stripe=16)
        src.unlink()
        names = erasure.piece_names(src.name, 5)
        saved = {n: (tmp_path / n).read_bytes() for n in names}
        assert lay.piece_length == -(-length // 3)
        for bad in itertools.combinations(range(5), 2):
            for i in bad:
                (tmp_path / names[i]).unlink()
            r = erasure.ErasureReader(src)
            assert set(r.bad) == set(bad) and r.read(0, length) == data and r.read(5, 20) == data[5:25]
            assert r.sha256() == lay.sha256
            assert erasure.repair(src) == [names[i] for i in bad]
            assert all((tmp_path / n).read_bytes() == saved[n] for n in names)


def test_erasure_settings_are_pack_inputs(packs, tmp_path: Path) -> None:
    plain, _ = packs
    corpus, tok = plain.parent / "corpus.jsonl", plain.parent / "tokenizer.json"
    out = tmp_path / "p"
    assert not pack_corpus(corpus, tok, out, 0.1, seed=1)["skipped"]
    assert not pack_corpus(corpus, tok, out, 0.1, seed=1, erasure=(3, 3))["skipped"]
    assert (out / "train.bin.piece005").is_file() and not (out / "train.bin").exists()
    assert pack_corpus(corpus, tok, out, 0.1, seed=1, erasure=(3, 3))["skipped"]
    assert not pack_corpus(corpus, tok, out, 0.1, seed=1, erasure=(2, 1))["skipped"]
    assert not (out / "train.bin.piece003").exists()  # pieces of the old layout are gone
    assert not pack_corpus(corpus, tok, out, 0.1, seed=1)["skipped"]
    assert (out / "train.bin").read_bytes() == (plain / "train.bin").read_bytes()
    assert not list(out.glob("*.piece*")) and not list(out.glob("*.ec.json"))
    with pytest.raises(DataError, match="k \\+ m <= 256"):
        pack_corpus(corpus, tok, out, 0.1, seed=1, erasure=(200, 100))


def test_config_and_prepare_data(packs, reference, tmp_path: Path) -> None:
    for k, m in ((4, 0), (0, 2), (-1, 2), (200, 57)):
        with pytest.raises(ConfigError, match="data.erasure"):
            DataConfig(erasure_k=k, erasure_m=m).validate()
    DataConfig(erasure_k=0, erasure_m=0).validate()
    DataConfig(erasure_k=10, erasure_m=4).validate()
    plain, _ = packs
    cfg = DataConfig(corpus=str(plain.parent / "corpus.jsonl"), dir=str(tmp_path / "w"), val_fraction=0.1, seed=1,
                     erasure_k=K, erasure_m=M)
    logs: list[str] = []
    out = prepare_data(cfg, TokenizerConfig(vocab_size=300, min_frequency=2), log=logs.append)
    assert "erasure-coded 4+2 pieces" in logs[-1]
    assert (out / PIECES[-1]).is_file() and not (out / "train.bin").exists()
    assert verify_pack(out, deep=True) == []


def test_pack_stage_keeps_a_decodable_pack_and_repacks_a_lost_one(packs, tmp_path: Path) -> None:
    """Rerunning the pack stage (every training start) keeps a pack with <= m bad pieces: its tokens
    still read exactly. With more than m bad it is packed again, to the same pieces."""
    plain, coded = packs
    corpus, tok = plain.parent / "corpus.jsonl", plain.parent / "tokenizer.json"
    d = copy_of(coded, tmp_path / "c")
    damage(d, (1, 5), "delete")
    assert pack_corpus(corpus, tok, d, 0.1, seed=1, erasure=(K, M), stripe=STRIPE)["skipped"]
    assert not (d / PIECES[1]).exists()
    damage(d, (2,), "corrupt")
    again = pack_corpus(corpus, tok, d, 0.1, seed=1, erasure=(K, M), stripe=STRIPE)
    assert not again["skipped"] and "3 of 6 erasure pieces bad" in again["repaired"]
    assert all((d / p).read_bytes() == (coded / p).read_bytes() for p in PIECES)


def test_repair_refuses_a_modified_sidecar(packs, tmp_path: Path) -> None:
    _, coded = packs
    d = copy_of(coded, tmp_path / "c")
    damage(d, (0,), "delete")
    side = json.loads((d / "train.bin.ec.json").read_text())
    side["pieces"][1] = "0" * 64
    (d / "train.bin.ec.json").write_text(json.dumps(side))
    lines: list[str] = []
    assert verify_command([str(d)], repair=True, out=lines.append, err=lines.append) == 1
    assert len(lines) == 1 and "train.bin.ec.json" in lines[0] and "differs from its sha256" in lines[0]
    assert not (d / PIECES[0]).exists()  # nothing was written
