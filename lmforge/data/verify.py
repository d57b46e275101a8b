"""Integrity of a packed data dir against its manifest.

The manifest fingerprints every shard and index ({"sha256", "size", "mtime_ns"}). Opening a split
checks size and mtime and re-hashes only a file whose size or mtime changed (bytes replaced in
place with the same size still change the mtime), so a normal start costs a few `stat` calls.
`lmforge data verify` (deep) re-hashes everything and also checks what a hash cannot tell about a
consistent but wrong pack: token ids inside the vocabulary, and the document index.

An erasure-coded split (lmforge.data.erasure: its token file stored as k data + m parity pieces)
is checked piece by piece against the sha256 in its sidecar, each bad piece one problem;
`verify_pack(pieces="skip")` leaves the pieces to the loader, which decodes around up to m bad
ones, and `pieces="decodable"` (the pack stage's reuse check) accepts up to m bad pieces: the
tokens read are still exact, so a lost piece costs no repack. `repair_pack` rewrites bad pieces
from the good ones (`lmforge data verify --repair`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np

from lmforge.data import erasure
from lmforge.data.errors import DataError
from lmforge.data.files import fingerprint, read_json, same_content, write_json_atomic

SPLITS = ("train", "val")
PieceCheck = Literal["each", "decodable", "skip"]
_SCAN_TOKENS = 1 << 24  # tokens per chunk of the deep id scan (bounded memory)


def erasure_of(manifest: dict | None, split: str) -> dict | None:
    """The split's {"k", "m"} when its token file is stored as erasure pieces, else None."""
    info = ((manifest or {}).get("splits") or {}).get(split) or {}
    ec = info.get("erasure") if isinstance(info, dict) else None
    return ec if isinstance(ec, dict) else None


def split_files(split: str, manifest: dict | None = None, with_pieces: bool = True) -> list[str]:
    """The files of one split the manifest fingerprints: the token file (erasure-coded: its
    sidecar and, `with_pieces`, its k + m pieces), the document index and the row numbers."""
    ec = erasure_of(manifest, split)
    tokens = [f"{split}.bin"]
    if ec is not None:
        tokens = [erasure.sidecar_path(Path(f"{split}.bin")).name]
        tokens += erasure.piece_names(f"{split}.bin", int(ec["k"]) + int(ec["m"])) if with_pieces else []
    return [*tokens, f"{split}.idx.npy", f"{split}.docs.npy"]


def pack_files(splits: tuple[str, ...] = SPLITS, manifest: dict | None = None,
               with_pieces: bool = True) -> list[str]:
    """Every file of a pack the manifest fingerprints (`manifest` says which splits are pieced)."""
    return [name for split in splits for name in split_files(split, manifest, with_pieces)]


def _hash_problems(out_dir: Path, manifest: dict, splits: tuple[str, ...], deep: bool, pieces: PieceCheck
                   ) -> list[str]:
    files = manifest.get("files")
    if not isinstance(files, dict):
        return [f"{out_dir / 'manifest.json'}: has no file fingerprints (written by an older lmforge)"]
    problems = []
    for name in pack_files(splits, manifest, with_pieces=False):
        path, known = out_dir / name, files.get(name)
        if not isinstance(known, dict) or not isinstance(known.get("sha256"), str):
            problems.append(f"{out_dir / 'manifest.json'}: no fingerprint for {name}")
        elif not path.is_file():
            problems.append(f"{path}: missing although the manifest lists it")
        elif fingerprint(path, None if deep else known)["sha256"] != known["sha256"]:
            problems.append(f"{path}: content differs from the sha256 in the manifest (modified after packing)")
    for split in splits if pieces != "skip" and not problems else ():
        if erasure_of(manifest, split) is not None:
            problems += _piece_problems(out_dir, manifest, split, None if deep else files, pieces == "decodable")
    return problems


def _piece_problems(out_dir: Path, manifest: dict, split: str, known: dict | None, decodable: bool) -> list[str]:
    """One line per bad piece of a pieced split (none when `decodable` and at most m are bad), or
    one line when too many are bad to decode."""
    path = out_dir / manifest["splits"][split]["file"]
    layout = erasure.read_layout(path)
    if layout.sha256 != manifest["splits"][split].get("sha256"):
        return [f"{erasure.sidecar_path(path)}: the file's sha256 differs from {split}'s in the manifest"]
    bad = erasure.check_pieces(path, layout, known)
    if len(bad) > layout.m:
        return [f"{path}: {len(bad)} of {layout.n} erasure pieces bad ({erasure.describe_bad(path, bad)}), "
                f"decoding needs {layout.k}: the split is lost, repack it (`lmforge data prepare`)"]
    if decodable:
        return []
    return [f"{path.with_name(erasure.piece_names(path.name, layout.n)[i])}: {why}; rebuildable from the other "
            f"pieces (`lmforge data verify --repair {out_dir}`)" for i, why in sorted(bad.items())]


def _content_problems(out_dir: Path, manifest: dict, split: str) -> list[str]:
    """Token ids below vocab_size; document offsets from 0 to the token count, each document ending
    with the end-of-text id. A pieced split is read decoded (and its whole-file sha256 checked)."""
    info = manifest["splits"][split]
    dtype, n_tokens, n_docs = np.dtype(manifest["dtype"]), int(info["tokens"]), int(info["documents"])
    vocab, eos = int(manifest["vocab_size"]), int(manifest["eos_id"])
    path = out_dir / info["file"]
    reader = erasure.ErasureReader(path, manifest["files"]) if erasure_of(manifest, split) is not None else None
    size = len(reader) if reader is not None else path.stat().st_size
    if size != n_tokens * dtype.itemsize:
        return [f"{path}: {size} bytes, the manifest says {n_tokens} tokens of {dtype.name}"]
    if reader is not None and reader.sha256() != reader.layout.sha256:
        return [f"{path}: decoded from its pieces, content differs from the sha256 in {erasure.sidecar_path(path)}"]
    tokens = reader.view(dtype) if reader is not None else \
        np.memmap(path, dtype=dtype, mode="r", shape=(n_tokens,)) if n_tokens else np.zeros(0, dtype)
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
    if n_docs and not _ends_are(tokens, offsets[1:] - 1, eos):
        return [f"{path}: a document does not end with the end-of-text id {eos}"]
    return []


def _ends_are(tokens: np.ndarray | erasure.TypedView, ends: np.ndarray, eos: int) -> bool:
    """Whether every position in `ends` (sorted) holds `eos`; a decoded view is read in chunks."""
    if isinstance(tokens, np.ndarray):
        return bool(np.all(tokens[ends] == eos))
    for start in range(0, len(tokens), _SCAN_TOKENS):
        sel = ends[(ends >= start) & (ends < start + _SCAN_TOKENS)] - start
        if sel.size and np.any(tokens[start:start + _SCAN_TOKENS][sel] != eos):
            return False
    return True


def verify_pack(out_dir: Path | str, manifest: dict | None = None, *, deep: bool = False,
                splits: tuple[str, ...] = SPLITS, pieces: PieceCheck = "each") -> list[str]:
    """One line per problem of the pack in `out_dir` (empty: intact). `deep` re-hashes every file
    and scans its contents; otherwise only files whose size or mtime changed are re-hashed.
    Erasure pieces: "each" bad one is a problem; "decodable": only more than m bad in a split;
    "skip": not checked (the loader checks them itself)."""
    out_dir = Path(out_dir)
    if manifest is None and not out_dir.is_dir():
        return [f"{out_dir}: no such directory"]
    manifest = manifest if manifest is not None else read_json(out_dir / "manifest.json")
    if manifest is None:
        return [f"{out_dir}: no readable manifest.json; run `lmforge data prepare` for it"]
    try:
        problems = _hash_problems(out_dir, manifest, splits, deep, pieces)
        if deep and not problems:
            for split in splits:
                problems += _content_problems(out_dir, manifest, split)
    except DataError as e:  # an unusable erasure sidecar, or zfec missing
        problems = [str(e)]
    except (KeyError, TypeError, ValueError) as e:
        problems = [f"{out_dir / 'manifest.json'}: malformed ({e.__class__.__name__}: {e})"]
    except OSError as e:
        problems = [f"{out_dir}: cannot read ({e.__class__.__name__}: {e})"]
    return problems


def repair_pack(out_dir: Path | str) -> list[str]:
    """Rewrite the missing or corrupt erasure pieces of every pieced split of the pack in `out_dir`
    (every piece re-hashed, not trusted by mtime) and re-fingerprint them in the manifest. Returns
    the rewritten file names; DataError when a split has more than m bad pieces."""
    out_dir = Path(out_dir)
    manifest = read_json(out_dir / "manifest.json")
    if manifest is None or not isinstance(manifest.get("files"), dict):
        raise DataError(f"{out_dir}: no readable manifest.json with file fingerprints; run `lmforge data prepare`")
    fixed = []
    for split in SPLITS:
        if erasure_of(manifest, split) is not None:
            path = out_dir / manifest["splits"][split]["file"]
            side = erasure.sidecar_path(path)
            if not same_content(side, manifest["files"].get(side.name)):  # the piece hashes come from it
                raise DataError(f"{side}: missing or differs from its sha256 in the manifest, so bad pieces cannot "
                                "be told from good ones; repack the data (`lmforge data prepare`)")
            fixed += erasure.repair(path)
    if fixed:
        manifest["files"].update({name: fingerprint(out_dir / name) for name in fixed})
        write_json_atomic(out_dir / "manifest.json", manifest)
    return fixed


def verify_command(dirs: list[str], repair: bool = False, out: Callable[[str], None] = print,
                   err: Callable[[str], None] = lambda line: print(line, file=sys.stderr)) -> int:
    """`lmforge data verify DIR... [--repair]`: deep check of each pack, one line each ("ok" or the
    first problem); with `repair`, bad erasure pieces are rewritten and the pack checked again.
    Returns the exit code: 1 if any pack is still invalid."""
    bad = 0
    for target in dirs:
        problems = verify_pack(Path(target), deep=True)
        if problems and repair:
            try:
                fixed = repair_pack(Path(target))
            except DataError as e:
                fixed, problems = [], [str(e)]
            if fixed:
                out(f"{target}: rebuilt {', '.join(fixed)} from the other erasure pieces")
                problems = verify_pack(Path(target), deep=True)
        if problems:
            bad += 1
            err(f"{target}: INVALID: {problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""))
        else:
            out(f"{target}: ok")
    return 1 if bad else 0
