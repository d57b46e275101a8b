"""Small file helpers shared by the data stages: atomic writes and cheap content fingerprints.

Every stage writes temp-then-`os.replace`, so an interrupted run never leaves a half-written file
under a final name; fingerprints let a rerun skip a stage whose inputs have not changed.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.storage.atomic import atomic_open  # the one atomic-write primitive (re-exported here)

NONFINITE_KEY = "nonfinite"


def _nonfinite_name(x: float) -> str:
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def strict_json_value(obj: Any, path: str = "", found: dict[str, str] | None = None) -> Any:
    """`obj` with every NaN/inf float (Python or numpy) replaced by None; `found` collects
    {dotted path: "nan" | "inf" | "-inf"} of what was replaced."""
    if isinstance(obj, float | np.floating):
        x = float(obj)
        if math.isfinite(x):
            return x if isinstance(obj, np.floating) else obj
        if found is not None:
            found[path] = _nonfinite_name(x)
        return None
    if isinstance(obj, dict):
        return {k: strict_json_value(v, f"{path}.{k}" if path else str(k), found) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict_json_value(v, f"{path}[{i}]", found) for i, v in enumerate(obj)]
    return obj


def strict_json_record(obj: Any) -> Any:
    """A value strict JSON parsers accept: non-finite numbers become null, and a dict gets a
    "nonfinite" entry naming them ({"loss": "nan"}), so nothing is lost and `json.loads` in other
    languages (and `jq`) never meets `NaN` or `Infinity`."""
    found: dict[str, str] = {}
    clean = strict_json_value(obj, "", found)
    if found and isinstance(clean, dict):
        clean[NONFINITE_KEY] = found
    return clean


def dumps_strict(obj: Any, **kwargs: Any) -> str:
    """`json.dumps` of `strict_json_record(obj)`, refusing any NaN/inf left (there are none)."""
    return json.dumps(strict_json_record(obj), allow_nan=False, **kwargs)


def restore_nonfinite(record: Any) -> Any:
    """Inverse of `strict_json_record` for a flat record: the null values it names are NaN/inf again."""
    flags = record.get(NONFINITE_KEY) if isinstance(record, dict) else None
    if not isinstance(flags, dict):
        return record
    out = {k: v for k, v in record.items() if k != NONFINITE_KEY}
    for key, name in flags.items():
        if key in out and out[key] is None and name in ("nan", "inf", "-inf"):
            out[key] = float(name)
    return out


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
