"""A checkpoint's integrity: its manifest (every file with size and sha256), the check that a
directory is a complete, unmodified checkpoint, and the atomic publish that makes it one.

Layout of one checkpoint, `<root>/step-00000100/`:

    .metadata, __<rank>_<n>.distcp     written by DCP (every rank writes its own shards)
    lmforge-checkpoint.json            manifest written last by rank 0: step, format version,
                                       world size, every file with its size and sha256

Why a manifest: DCP writes .metadata once every rank has written its data, but a crash, a full
disk or a later bit flip can still leave a directory that *looks* complete. A checkpoint is valid
only when its name has no `.tmp` suffix, its manifest is there and every listed file has the
listed size and sha256 (and every file DCP's metadata refers to is listed). Saving writes into
`step-N.tmp/`, writes the manifest last, fsyncs, and renames (`publish_dir`); so a crash at any
point leaves either the old state or a complete new checkpoint.

Everything here is local (no collectives): the manager decides on rank 0 and shares the answer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from lmforge.storage.atomic import atomic_open, fsync_dir
from lmforge.storage.layout import DCP_METADATA, MANIFEST, step_of
from lmforge.storage.strict_json import dumps_strict

__all__ = ["FORMAT", "FORMAT_VERSION", "REPLACED_SUFFIX", "UNFINISHED_SUFFIX", "Verdict", "base_of", "publish_dir",
           "read_manifest", "saved_metadata", "unfinished_dir", "verify_checkpoint", "write_manifest"]

FORMAT = "lmforge-checkpoint"
FORMAT_VERSION = 1
UNFINISHED_SUFFIX = ".tmp"  # step-N.tmp: a save in progress, or one that crashed (never valid)
REPLACED_SUFFIX = ".old"  # step-N.old: a checkpoint being replaced by a new save of the same step


@dataclass(frozen=True)
class Verdict:
    """The outcome of `verify_checkpoint`: valid or not, why (one line), and the manifest's step."""

    ok: bool
    reason: str
    step: int | None = None


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _hash_files(paths: list[Path]) -> list[str]:
    """sha256 of each file, files in parallel (hashlib releases the GIL): ~1-2 GB/s per core with
    SHA extensions, each file read once."""
    if len(paths) <= 1:
        return [_sha256(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1, len(paths))) as pool:
        return list(pool.map(_sha256, paths))


def read_manifest(path: Path) -> tuple[dict | None, str]:
    """(the manifest of checkpoint directory `path`, '') when it is there and well-formed, else
    (None, why not). Checks its shape only; `verify_checkpoint` checks the files it lists."""
    mpath = path / MANIFEST
    if not mpath.is_file():
        return None, f"no {MANIFEST} (an incomplete save, or not an lmforge checkpoint)"
    try:
        m = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"unreadable {MANIFEST} ({e.__class__.__name__}: {e})"
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        return None, f"{MANIFEST} is not an lmforge checkpoint manifest"
    if not isinstance(m.get("version"), int) or m["version"] > FORMAT_VERSION:
        return None, f"{MANIFEST} has format version {m.get('version')!r}; this lmforge reads <= {FORMAT_VERSION}"
    files = m.get("files")
    if not isinstance(m.get("step"), int) or not isinstance(files, list) or not all(
            isinstance(f, dict) and isinstance(f.get("path"), str) and isinstance(f.get("size"), int)
            and isinstance(f.get("sha256"), str) for f in files):
        return None, f"{MANIFEST} is malformed (step or files missing)"
    return m, ""


def _fingerprint(path: Path, manifest: dict) -> tuple:
    """Cheap identity of a checkpoint's files (size, mtime, ctime, inode), so that a checkpoint this
    manager hashed moments ago is not hashed again (resolve_resume("auto") then load())."""
    out = []
    for rel in [MANIFEST, *(f["path"] for f in manifest["files"])]:
        st = (path / rel).stat()
        out.append((rel, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
    return tuple(out)


def verify_checkpoint(path: Path, deep: bool = True, cache: dict | None = None) -> Verdict:
    """Local (no collectives) integrity check of one checkpoint directory.

    deep=False checks names, manifest and sizes only (for pruning); deep=True also hashes every
    file and checks DCP's metadata refers only to listed files. `cache` ({resolved path: file
    fingerprint}) remembers checkpoints hashed OK, so a deep check of an unchanged one is cheap."""
    path = Path(path)
    if not path.exists():
        return Verdict(False, "does not exist")
    if not path.is_dir():
        return Verdict(False, "is not a directory")
    if path.name.endswith(UNFINISHED_SUFFIX):
        return Verdict(False, "unfinished save (.tmp directory: the writer stopped before publishing it)")
    manifest, reason = read_manifest(path)
    if manifest is None:
        return Verdict(False, reason)
    step = manifest["step"]
    named_step = step_of(path)
    if named_step >= 0 and named_step != step:
        return Verdict(False, f"directory name says step {named_step} but {MANIFEST} says step {step}")
    entries = manifest["files"]
    if not any(f["path"] == DCP_METADATA for f in entries):
        return Verdict(False, f"{MANIFEST} lists no DCP {DCP_METADATA} file")
    for f in entries:
        rel = f["path"]
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            return Verdict(False, f"{MANIFEST} lists a path outside the checkpoint: {rel}")
        fp = path / rel
        if not fp.is_file():
            return Verdict(False, f"file {rel} is missing")
        size = fp.stat().st_size
        if size != f["size"]:
            return Verdict(False, f"file {rel} has {size} bytes, the manifest says {f['size']} (truncated or overwritten)")
    if deep:
        try:
            fingerprint = _fingerprint(path, manifest)
        except OSError as e:
            return Verdict(False, f"cannot stat files ({e})")
        key = str(path.resolve())
        if cache is not None and cache.get(key) == fingerprint:
            return Verdict(True, "ok", step)
        try:
            digests = _hash_files([path / f["path"] for f in entries])
        except OSError as e:
            return Verdict(False, f"cannot read files ({e})")
        for f, digest in zip(entries, digests):
            if digest != f["sha256"]:
                return Verdict(False, f"file {f['path']} does not match its sha256 in the manifest (modified or corrupt)")
    try:
        meta = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001 (any failure to read DCP metadata makes it invalid)
        return Verdict(False, f"unreadable DCP metadata ({e.__class__.__name__})")
    listed = {f["path"] for f in entries}
    storage = getattr(meta, "storage_data", None) or {}
    unlisted = sorted({getattr(v, "relative_path", None) for v in storage.values()} - listed - {None})
    if unlisted:
        return Verdict(False, f"DCP metadata refers to files not in the manifest: {', '.join(unlisted[:3])}")
    if manifest.get("kind") == "incremental":
        why = _verify_base(path, manifest, deep, cache)
        if why:
            return Verdict(False, why)
    if not deep:
        return Verdict(True, "ok (sizes)", step)
    if cache is not None:
        cache[key] = fingerprint
    return Verdict(True, "ok", step)


def base_of(path: Path, manifest: Mapping[str, Any]) -> Path | None:
    """The full checkpoint an incremental one takes its unchanged tensors from (a sibling dir)."""
    name = manifest.get("base")
    if manifest.get("kind") != "incremental" or not isinstance(name, str):
        return None
    return path.parent / name


def _verify_base(path: Path, manifest: Mapping[str, Any], deep: bool, cache: dict | None) -> str:
    """'' when the base of incremental checkpoint `path` is valid and holds every key it refers to."""
    name, refs = manifest.get("base"), manifest.get("refs")
    if not isinstance(name, str) or "/" in name or name.startswith(".") or not isinstance(refs, list):
        return f"{MANIFEST} is malformed (incremental without a base or refs)"
    base = path.parent / name
    vb = verify_checkpoint(base, deep=deep, cache=cache)
    if not vb.ok:
        return f"its base checkpoint {name} is not valid ({vb.reason})"
    base_manifest, _ = read_manifest(base)
    if base_manifest is None or base_manifest.get("kind") == "incremental":
        return f"its base checkpoint {name} is not a full checkpoint"
    keys = set(dcp.FileSystemReader(str(base)).read_metadata().state_dict_metadata)
    missing = [k for k in refs if k not in keys]
    if missing:
        return f"its base checkpoint {name} lacks {len(missing)} tensor(s) it refers to, e.g. {missing[0]}"
    return ""


def saved_metadata(path: Path) -> dict[str, Any]:
    """DCP metadata per stored key of checkpoint `path`, including keys an incremental checkpoint
    takes from its base (so checks see the whole state)."""
    out = dict(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    manifest, _ = read_manifest(path)
    base = base_of(path, manifest) if manifest else None
    if base is not None:
        base_meta = dcp.FileSystemReader(str(base)).read_metadata().state_dict_metadata
        out.update({k: base_meta[k] for k in manifest["refs"] if k in base_meta})
    return out


def write_manifest(path: Path, step: int, world_size: int, extra: Mapping[str, Any] | None = None) -> dict:
    """Hash every file DCP wrote into the unfinished checkpoint `path` and write its manifest
    (atomically: a crash leaves no half manifest); returns the manifest. `extra` adds or overrides
    fields (storage options; an incremental checkpoint's base and refs)."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST
                   and not p.name.startswith(MANIFEST))
    rels = [p.relative_to(path).as_posix() for p in files]
    digests = _hash_files(files)
    meta = dcp.FileSystemReader(str(path)).read_metadata()
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "step": step,
        "world_size": world_size,
        "created_unix": time.time(),
        "torch_version": torch.__version__,
        "checksum": "sha256",
        "keys": sorted({k.split(".", 1)[0] for k in [*meta.state_dict_metadata, *(extra or {}).get("refs", ())]}),
        "files": [{"path": r, "size": p.stat().st_size, "sha256": d} for r, p, d in zip(rels, files, digests)],
        "kind": "full", "compression": "none", "optimizer_states": "fp32",
        **(extra or {}),
    }
    manifest["bytes"] = sum(f["size"] for f in manifest["files"])
    with atomic_open(path / MANIFEST, "w") as f:  # its temp name starts with MANIFEST: never listed
        f.write(dumps_strict(manifest, indent=1))
    return manifest


# -- publish -----------------------------------------------------------------------------------------


def unfinished_dir(final: Path) -> Path:
    """Where a save of checkpoint `final` writes before it is published: `step-N.tmp` beside it.
    A fixed name, not a random temp name: every rank writes its shards there, resume skips it and
    pruning removes it as a crash leftover (`step_of` reads N from it)."""
    return final.with_name(final.name + UNFINISHED_SUFFIX)


def publish_dir(tmp: Path, final: Path) -> None:
    """Atomically rename the complete `tmp` to `final`; an existing `final` (e.g. a corrupt one a
    resume skipped) is moved aside to `step-N.old` first and deleted only after the new one is in
    place. (Not storage.atomic.atomic_dir: that fills a randomly named temp directory itself,
    while here all ranks have already written into the fixed `unfinished_dir` name.)"""
    old = final.with_name(final.name + REPLACED_SUFFIX)
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
