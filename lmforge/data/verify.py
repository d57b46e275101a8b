"""Integrity of a packed data dir against its manifest.

The manifest fingerprints every shard and index ({"sha256", "size", "mtime_ns"}). Opening a split
checks size and mtime and re-hashes only a file whose size or mtime changed (bytes replaced in
place with the same size still change the mtime), so a normal start costs a few `stat` calls.
`lmforge data verify` (deep) re-hashes everything and also checks what a hash cannot tell about a
consistent but wrong pack: token ids inside the vocabulary, and the document index.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmforge.data.files import fingerprint, read_json

SPLITS = ("train", "val")
_SCAN_TOKENS = 1 << 24  # tokens per chunk of the deep id scan (bounded memory)


def split_files(split: str) -> list[str]:
    return [f"{split}.bin", f"{split}.idx.npy", f"{split}.docs.npy"]


def pack_files(splits: tuple[str, ...] = SPLITS) -> list[str]:
    """Every file of a pack the manifest fingerprints."""
    return [name for split in splits for name in split_files(split)]


def _hash_problems(out_dir: Path, manifest: dict, splits: tuple[str, ...], deep: bool) -> list[str]:
    files = manifest.get("files")
    if not isinstance(files, dict):
        return [f"{out_dir / 'manifest.json'}: has no file fingerprints (written by an older lmforge)"]
    problems = []
    for name in pack_files(splits):
        path, known = out_dir / name, files.get(name)
        if not isinstance(known, dict) or not isinstance(known.get("sha256"), str):
            problems.append(f"{out_dir / 'manifest.json'}: no fingerprint for {name}")
        elif not path.is_file():
            problems.append(f"{path}: missing although the manifest lists it")
        elif fingerprint(path, None if deep else known)["sha256"] != known["sha256"]:
            problems.append(f"{path}: content differs from the sha256 in the manifest (modified after packing)")
    return problems


def _content_problems(out_dir: Path, manifest: dict, split: str) -> list[str]:
    """Token ids below vocab_size; document offsets from 0 to the token count, each document ending
    with the end-of-text id."""
    info = manifest["splits"][split]
    dtype, n_tokens, n_docs = np.dtype(manifest["dtype"]), int(info["tokens"]), int(info["documents"])
    vocab, eos = int(manifest["vocab_size"]), int(manifest["eos_id"])
    path = out_dir / info["file"]
    if path.stat().st_size != n_tokens * dtype.itemsize:
        return [f"{path}: {path.stat().st_size} bytes, the manifest says {n_tokens} tokens of {dtype.name}"]
    tokens = np.memmap(path, dtype=dtype, mode="r", shape=(n_tokens,)) if n_tokens else np.zeros(0, dtype)
    for start in range(0, n_tokens, _SCAN_TOKENS):
        chunk = tokens[start:start + _SCAN_TOKENS]
        top = int(chunk.max())
        if top >= vocab:
            at = start + int(np.argmax(chunk >= vocab))
            return [f"{path}: token id {top} at position {at} is outside the vocabulary ({vocab} ids)"]
    idx_path = out_dir / f"{split}.idx.npy"
    try:
        offsets = np.load(idx_path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        return [f"{idx_path}: not a readable index ({e.__class__.__name__}: {e})"]
    if offsets.ndim != 1 or len(offsets) != n_docs + 1 or (n_docs and (offsets[0] != 0 or offsets[-1] != n_tokens
                                                                        or np.any(np.diff(offsets) < 1))):
        return [f"{idx_path}: document offsets do not run from 0 to {n_tokens} over {n_docs} documents"]
    if n_docs and np.any(tokens[offsets[1:] - 1] != eos):
        return [f"{path}: a document does not end with the end-of-text id {eos}"]
    return []


def verify_pack(out_dir: Path | str, manifest: dict | None = None, *, deep: bool = False,
                splits: tuple[str, ...] = SPLITS) -> list[str]:
    """One line per problem of the pack in `out_dir` (empty: intact). `deep` re-hashes every file
    and scans its contents; otherwise only files whose size or mtime changed are re-hashed."""
    out_dir = Path(out_dir)
    manifest = manifest if manifest is not None else read_json(out_dir / "manifest.json")
    if manifest is None:
        return [f"{out_dir}: no readable manifest.json; run `lmforge data prepare` for it"]
    try:
        problems = _hash_problems(out_dir, manifest, splits, deep)
        if deep and not problems:
            for split in splits:
                problems += _content_problems(out_dir, manifest, split)
    except (KeyError, TypeError, ValueError) as e:
        problems = [f"{out_dir / 'manifest.json'}: malformed ({e.__class__.__name__}: {e})"]
    except OSError as e:
        problems = [f"{out_dir}: cannot read ({e.__class__.__name__}: {e})"]
    return problems
