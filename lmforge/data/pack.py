"""Pack stage: corpus.jsonl + tokenizer.json -> token shards the loader memory-maps.

Layout of `out_dir` (all written temp-then-rename; the manifest last, so its presence means done):

    train.bin, val.bin          raw token ids (uint16 when every id fits, else uint32); each document
                                is followed by the end-of-text id
    train.idx.npy, val.idx.npy  int64 offsets of document starts, plus the end (len = documents + 1)
    train.docs.npy, val.docs.npy  int64 corpus line number (0-based) of each packed document
    manifest.json               dtype, vocab, counts per split, sha256 of inputs and shards, seed, and
                                "files": a fingerprint (sha256, size, mtime) of every file above, checked
                                when a pack is reused or opened (lmforge.data.verify)

Domains: when the corpus lines carry `metadata.domain` (the pipeline's `domain` step), train.bin
holds each domain's training documents as one contiguous range, domains in name order (so every
file, fingerprint, erasure piece and check above applies unchanged: one file, not one per domain),
and the manifest lists them under the train split as "domains": [{name, start, tokens,
documents}], the sizes the mixing weights come from (lmforge.data.mixing). Validation stays one
file in corpus order, all domains together: the
held-out loss is then comparable whatever the training weights, and the loader reads it in order
(its "domain_counts": tokens and documents per domain).

With erasure coding on (`erasure=(k, m)`, data.erasure_k / erasure_m), each `<split>.bin` is kept
only as k data + m parity pieces and a sidecar (`<split>.bin.piece000`..., `<split>.bin.ec.json`,
lmforge.data.erasure): any m pieces may be lost or corrupt and the loader still reads the same
tokens. The manifest fingerprints the sidecar and pieces instead of the .bin and records
{"k", "m"} under the split; the settings are a pack input, so changing them repacks.

Documents are tokenized in pieces of bounded size cut at pre-token boundaries (identical ids), so
one huge document needs no more memory than many small ones.

The validation split is a seeded random set of whole documents, never a cut inside one, so no
validation text leaks into training. `prepare_data` chains the stages (corpus, the default
document pipeline for the default corpus: data/default_pipeline.py, tokenizer, pack); each is
skipped when its output is already valid for its inputs.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from lmforge.config.job import DataConfig, TokenizerConfig
from lmforge.data import erasure as ec
from lmforge.data.corpus import prepare_corpus
from lmforge.data.default_pipeline import prepare_pipeline
from lmforge.data.errors import DataError
from lmforge.data.files import atomic_open, fingerprint, read_json, sha256_file, write_json_atomic
from lmforge.data.tokenizer import TextTokenizer, bounded_pieces, tokenizer_is_current, train_tokenizer
from lmforge.data.verify import pack_files, verify_pack

PACK_FORMAT = 2  # 2: manifest fingerprints every file ("files"); long documents packed in pieces
SPLITS = ("train", "val")
MANIFEST = "manifest.json"
_CHUNK_CHARS = 1 << 20  # text per encode_batch call: ~200 bytes of Rust-side state per character
_CHUNK_DOCS = 4096


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding every id in [0, vocab_size): uint16 up to 65536 ids."""
    if vocab_size <= 0 or vocab_size > 2**32:
        raise DataError(f"vocab_size = {vocab_size}: must be in [1, 2**32]")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def split_documents(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask, True for validation documents: round(n * val_fraction) of them (at least one,
    and at least one left for training), chosen by a numpy Generator seeded with `seed`."""
    if n_docs < 2:
        raise DataError(f"corpus has {n_docs} document(s); need at least 2 to hold out a validation split")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction = {val_fraction}: must be in (0, 1)")
    n_val = min(max(1, round(n_docs * val_fraction)), n_docs - 1)
    mask = np.zeros(n_docs, dtype=bool)
    mask[np.random.default_rng(seed).choice(n_docs, size=n_val, replace=False)] = True
    return mask


def _piece_batches(corpus_jsonl: Path, domains: list[str]) -> Iterator[list[tuple[int, str, bool]]]:
    """(corpus row, piece of its text, last piece of the document?) in batches of about
    `_CHUNK_CHARS` characters: long documents are cut at pre-token boundaries
    (tokenizer.bounded_pieces), so the Rust tokenizer never holds more than a batch at once.
    Appends each row's domain (`metadata.domain` of a pipeline output line, else "") to `domains`."""
    batch: list[tuple[int, str, bool]] = []
    chars = 0
    with open(corpus_jsonl, encoding="utf-8") as f:
        for row, line in enumerate(f):
            try:
                obj = json.loads(line)
                text = obj["text"]
                domains.append(str((obj.get("metadata") or {}).get("domain") or ""))
                del obj
            except (ValueError, KeyError, TypeError, AttributeError):
                raise DataError(f"{corpus_jsonl}:{row + 1}: not a corpus line written by lmforge; delete it and "
                                "rerun `lmforge data prepare`") from None
            del line
            pieces = bounded_pieces(text)
            piece = next(pieces)
            for following in pieces:
                batch.append((row, piece, False))
                chars += len(piece)
                piece = following
                if chars >= _CHUNK_CHARS:
                    yield batch
                    batch, chars = [], 0
            batch.append((row, piece, True))
            chars += len(piece)
            del text
            if chars >= _CHUNK_CHARS or len(batch) >= _CHUNK_DOCS:
                yield batch
                batch, chars = [], 0
    if batch:
        yield batch


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 22), b""))


def _manifest_inputs(corpus: dict, tokenizer: dict, val_fraction: float, seed: int,
                     erasure: tuple[int, int], stripe: int) -> dict:
    inputs = {"format": PACK_FORMAT, "corpus_sha256": corpus["sha256"], "tokenizer_sha256": tokenizer["sha256"],
              "val_fraction": val_fraction, "seed": seed}
    if erasure != (0, 0):  # only when on: plain packs written before erasure coding stay current
        inputs["erasure"] = {"k": erasure[0], "m": erasure[1], "stripe": stripe}
    return inputs


def _remove_pieces(out_dir: Path, split: str) -> None:
    """Erasure pieces and sidecar of `split` left by an earlier pack (also their temp files)."""
    for p in out_dir.glob(f"{split}.bin.piece*"):
        p.unlink(missing_ok=True)
    ec.sidecar_path(out_dir / f"{split}.bin").unlink(missing_ok=True)


def pack_corpus(corpus_jsonl: Path, tokenizer_json: Path, out_dir: Path, val_fraction: float,
                seed: int, erasure: tuple[int, int] = (0, 0), stripe: int = ec.DEFAULT_STRIPE) -> dict:
    """Tokenise every document, append eos, and write the train/val shards, indexes and manifest;
    with `erasure` = (k, m) != (0, 0) each token file is stored as k + m erasure pieces instead.

    Returns the manifest, plus "skipped": True when an existing pack already matched the inputs
    (corpus and tokenizer content, val_fraction, seed, erasure settings) and nothing was rewritten.
    """
    if erasure != (0, 0):
        ec.check_params(*erasure)
    corpus_jsonl, tokenizer_json, out_dir = Path(corpus_jsonl), Path(tokenizer_json), Path(out_dir)
    for what, p in (("corpus", corpus_jsonl), ("tokenizer", tokenizer_json)):
        if not p.is_file():
            raise DataError(f"pack: {what} file {p} does not exist; run the earlier stages first")
    old = read_json(out_dir / MANIFEST) or {}
    corpus_fp = fingerprint(corpus_jsonl, old.get("corpus"))
    tok_fp = fingerprint(tokenizer_json, old.get("tokenizer"))
    inputs = _manifest_inputs(corpus_fp, tok_fp, val_fraction, seed, erasure, stripe)
    # up to m bad erasure pieces still read exactly (the loader warns; `data verify --repair` fixes them)
    problems = verify_pack(out_dir, old, pieces="decodable") if old.get("inputs") == inputs else []
    if old.get("inputs") == inputs and not problems:
        return {**old, "skipped": True}

    tok = TextTokenizer.from_file(tokenizer_json)
    dtype = token_dtype(tok.vocab_size)
    is_val = split_documents(_count_lines(corpus_jsonl), val_fraction, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # from here until the end the old pack is invalid
    for split in SPLITS:
        _remove_pieces(out_dir, split)

    # Training documents go to one part file per domain ("": unlabelled), concatenated into
    # train.bin in domain-name order below, so each domain is one contiguous token range.
    lengths: dict[str, list[int]] = {"val": []}
    doc_rows: dict[str, list[int]] = {"val": []}
    domains: list[str] = []
    eos = np.array([tok.eos_id], dtype=dtype)
    doc_tokens, n_docs = 0, len(is_val)  # tokens so far of the document being packed (pieces)
    with ExitStack() as stack:
        files = {"val": stack.enter_context(atomic_open(out_dir / "val.bin", "wb"))}
        for batch in _piece_batches(corpus_jsonl, domains):
            for (row, _, last), ids in zip(batch, tok.encode_batch([piece for _, piece, _ in batch])):
                if row >= n_docs:
                    raise DataError(f"{corpus_jsonl} changed while packing; rerun `lmforge data prepare`")
                split = "val" if is_val[row] else f"train.{domains[row]}"
                if split not in files:
                    files[split] = stack.enter_context(atomic_open(out_dir / f"{split}.part", "wb"))
                    lengths[split], doc_rows[split] = [], []
                arr = np.asarray(ids, dtype=np.int64)
                if arr.size and arr.max() >= tok.vocab_size:  # a cast would silently wrap: refuse
                    raise DataError(f"{tokenizer_json}: produced id {arr.max()} >= vocab_size {tok.vocab_size}")
                files[split].write(arr.astype(dtype).tobytes())
                doc_tokens += len(ids)
                if last:
                    files[split].write(eos.tobytes())
                    lengths[split].append(doc_tokens + 1)
                    doc_rows[split].append(row)
                    doc_tokens = 0
    if sum(len(v) for v in lengths.values()) != n_docs:
        raise DataError(f"{corpus_jsonl} changed while packing; rerun `lmforge data prepare`")
    parts = sorted(k for k in lengths if k != "val")
    train_domains = _join_train_parts(out_dir, parts, lengths, doc_rows)

    splits = {}
    for split in SPLITS:
        offsets = np.concatenate([[0], np.cumsum(lengths[split], dtype=np.int64)]).astype(np.int64)
        for name, arr in ((f"{split}.idx.npy", offsets), (f"{split}.docs.npy", np.asarray(doc_rows[split], np.int64))):
            with atomic_open(out_dir / name, "wb") as f:
                np.save(f, arr)
        splits[split] = {"file": f"{split}.bin", "tokens": int(offsets[-1]), "documents": len(lengths[split]),
                         "sha256": sha256_file(out_dir / f"{split}.bin")}
        if split == "train" and train_domains:
            splits[split]["domains"] = train_domains
        if split == "val" and train_domains:
            splits[split]["domain_counts"] = _domain_counts(doc_rows["val"], lengths["val"], domains)
        if erasure != (0, 0):  # the pieces replace the plain token file
            ec.encode_file(out_dir / f"{split}.bin", *erasure, stripe=stripe)
            (out_dir / f"{split}.bin").unlink()
            splits[split]["erasure"] = {"k": erasure[0], "m": erasure[1]}
    # Every file the loader or a rerun trusts, fingerprinted: opening checks size + mtime, and the
    # sha256 when either differs (lmforge.data.verify).
    files_fp = {name: fingerprint(out_dir / name) for name in pack_files(manifest={"splits": splits})}
    manifest = {
        "inputs": inputs, "corpus": corpus_fp, "tokenizer": tok_fp, "format": PACK_FORMAT,
        "files": files_fp, "dtype": dtype.name, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "splits": splits,
        "seed": seed, "val_fraction": val_fraction, "corpus_sha256": corpus_fp["sha256"],
        "tokenizer_sha256": tok_fp["sha256"], "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_json_atomic(out_dir / MANIFEST, manifest)
    return {**manifest, "skipped": False, "repaired": problems[0] if problems else None}


def _join_train_parts(out_dir: Path, parts: list[str], lengths: dict[str, list[int]],
                      doc_rows: dict[str, list[int]]) -> list[dict]:
    """train.bin from the per-domain part files (in `parts` order); `lengths["train"]` and
    `doc_rows["train"]` in the same order. Returns the domains' ranges [{name, start, tokens,
    documents}] (empty when the corpus has no domain labels)."""
    lengths["train"], doc_rows["train"], ranges, start = [], [], [], 0
    with atomic_open(out_dir / "train.bin", "wb") as f:
        for part in parts:
            with open(out_dir / f"{part}.part", "rb") as src:
                shutil.copyfileobj(src, f, 1 << 20)
            (out_dir / f"{part}.part").unlink()
            tokens = sum(lengths[part])
            ranges.append({"name": part.split(".", 1)[1] or "unlabelled", "start": start, "tokens": tokens,
                           "documents": len(lengths[part])})
            start += tokens
            lengths["train"] += lengths.pop(part)
            doc_rows["train"] += doc_rows.pop(part)
    return ranges if parts != ["train."] and parts else []


def _domain_counts(rows: list[int], lengths: list[int], domains: list[str]) -> list[dict]:
    out: dict[str, dict] = {}
    for row, n in zip(rows, lengths):
        d = out.setdefault(domains[row] or "unlabelled", {"name": domains[row] or "unlabelled", "tokens": 0,
                                                            "documents": 0})
        d["tokens"] += n
        d["documents"] += 1
    return [out[k] for k in sorted(out)]


def prepare_data(cfg: DataConfig, tok_cfg: TokenizerConfig, log: Callable[[str], None] = print) -> Path:
    """Corpus -> tokenizer -> packed shards in `cfg.dir`, each stage skipped when its output is
    already valid for its inputs (so every training start may call this cheaply). Returns the dir."""
    out = Path(cfg.dir)
    corpus_path, tok_path = out / "corpus.jsonl", out / "tokenizer.json"

    t0 = time.perf_counter()
    c = prepare_corpus(cfg.corpus, corpus_path, cfg.max_documents)
    srcs = ", ".join(f"{k} {v}" for k, v in sorted(c["sources"].items()))
    state = "up to date" if c["skipped_stage"] else f"built in {time.perf_counter() - t0:.1f}s"
    skipped = f", {c['skipped_lines']} malformed lines skipped" if c.get("skipped_lines") else ""
    if c.get("invalid_utf8"):
        skipped += ", invalid UTF-8 replaced with U+FFFD in " + ", ".join(
            f"{n} documents of {src}" for src, n in sorted(c["invalid_utf8"].items()))
    log(f"data: corpus {corpus_path} {state}: {c['documents']} documents ({srcs}), "
        f"{c['chars'] / 1e6:.1f}M chars{skipped}")

    if cfg.corpus == "default" and cfg.pipeline == "default":  # a user corpus goes in as it is
        t0 = time.perf_counter()
        p = prepare_pipeline(corpus_path, out / "pipeline")
        state = "up to date" if p["skipped_stage"] else f"run in {time.perf_counter() - t0:.1f}s"
        dropped = ", ".join(f"{n} {k}" for k, n in sorted(p["dropped"].items())) or "none"
        doms = ", ".join(f"{d} {s['documents']} docs / {s['chars'] / 1e6:.2f}M chars" for d, s in sorted(p["domains"].items()))
        log(f"data: pipeline {p['output']} {state}: {p['kept']} of {p['documents']} documents kept (dropped: "
            f"{dropped}); domains: {doms}")
        corpus_path = Path(p["output"])

    t0 = time.perf_counter()
    if tokenizer_is_current(corpus_path, tok_path, tok_cfg.vocab_size, tok_cfg.min_frequency):
        state = "up to date"
    else:
        train_tokenizer(corpus_path, tok_path, tok_cfg.vocab_size, tok_cfg.min_frequency)
        state = f"trained in {time.perf_counter() - t0:.1f}s"
    vocab = TextTokenizer.from_file(tok_path).vocab_size
    short = f" (corpus too small for {tok_cfg.vocab_size})" if vocab < tok_cfg.vocab_size else ""
    log(f"data: tokenizer {tok_path} {state}: byte-level BPE, vocab {vocab}{short}")

    t0 = time.perf_counter()
    m = pack_corpus(corpus_path, tok_path, out, cfg.val_fraction, cfg.seed, (cfg.erasure_k, cfg.erasure_m))
    state = "up to date" if m["skipped"] else f"packed in {time.perf_counter() - t0:.1f}s"
    if m.get("repaired"):
        log(f"data: warning: {m['repaired']}; packed again")
    tr, va = m["splits"]["train"], m["splits"]["val"]
    coded = f", erasure-coded {cfg.erasure_k}+{cfg.erasure_m} pieces" if cfg.erasure_k else ""
    log(f"data: shards {out} {state}: train {tr['tokens']:,} tokens / {tr['documents']} docs, "
        f"val {va['tokens']:,} tokens / {va['documents']} docs ({m['dtype']}{coded})")
    return out

