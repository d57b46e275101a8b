"""Small file helpers shared by the data stages: atomic writes and cheap content fingerprints.

Every stage writes temp-then-`os.replace`, so an interrupted run never leaves a half-written file
under a final name; fingerprints let a rerun skip a stage whose inputs have not changed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from lmforge.storage.atomic import atomic_open  # the one atomic-write primitive (re-exported here)
from lmforge.storage.strict_json import dumps_strict


def write_json_atomic(path: Path, obj: Any) -> None:
    """Strict JSON (see `dumps_strict`), written temp-then-rename."""
    text = dumps_strict(obj, indent=2, sort_keys=True)
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None when it is missing or unreadable (a stage then reruns)."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint(path: Path, known: dict | None = None) -> dict:
    """{"sha256", "size", "mtime_ns"} of a file.

    When `known` (an earlier fingerprint) has the same size and mtime, its hash is reused instead
    of re-reading the file: the trainer calls `prepare_data` at every start, and hashing a large
    corpus each time would be wasted work.
    """
    st = Path(path).stat()
    if known and known.get("size") == st.st_size and known.get("mtime_ns") == st.st_mtime_ns \
            and isinstance(known.get("sha256"), str):
        return {"sha256": known["sha256"], "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {"sha256": sha256_file(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def same_content(path: Path, known: dict | None) -> bool:
    """Whether `path` exists and still has the content fingerprinted in `known`."""
    if not known or not Path(path).is_file():
        return False
    return fingerprint(path, known)["sha256"] == known.get("sha256")


def packed_corpus(data_dir: Path, manifest: dict) -> Path | None:
    """The corpus file a pack was made from, whose rows `<split>.docs.npy` indexes: the default
    pipeline's `pipeline/output.jsonl` or `corpus.jsonl`, whichever has the content the manifest
    fingerprints (None: neither, the corpus changed since)."""
    known = manifest.get("corpus")
    for path in (Path(data_dir) / "pipeline" / "output.jsonl", Path(data_dir) / "corpus.jsonl"):
        if same_content(path, known):
            return path
    return None
