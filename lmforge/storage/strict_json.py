"""Strict JSON for every file lmforge writes: NaN and infinity are not JSON (strict parsers, `jq`
and other languages reject Python's `NaN`/`Infinity`), so they are written as null plus a
"nonfinite" entry naming them, and read back as floats."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

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


def read_json_object(path: Path, error: type[Exception]) -> dict[str, Any]:
    """The JSON object in `path`; `error` (one line naming the file) when it cannot be read, is not
    JSON or holds something other than an object."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise error(f"{path}: cannot read ({e.__class__.__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise error(f"{path}: must hold a JSON object")
    return obj
