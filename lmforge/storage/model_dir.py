"""Which kind of model directory a path is, read from its marker files alone.

No torch here: `lmforge serve|eval|generate|export|compress ...` answer a path that is no model
directory in ~0.2 s, before torch and the model code load (~2.5 s on 2 cores).
`serve.generate.resolve_source` classifies through `model_dir_kind`, so the early answer and the
loader cannot disagree.

    quantized   quantization.json (`lmforge compress quantize`; compress/artifact.py)
    hf          config.json + model.safetensors (or its shard index): a Hugging Face directory
    run         config.json holding a "model" table: an lmforge run directory
    checkpoint  a step directory: lmforge's manifest or DCP's .metadata
"""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.storage.explain import no_such_path
from lmforge.storage.layout import RunDir, holds_checkpoint

__all__ = ["HF_CONFIG", "HF_SAFETENSORS", "HF_SAFETENSORS_INDEX", "QUANTIZED_META", "ModelDirError",
           "is_run_dir", "model_dir_kind", "require_hf_dir"]

HF_CONFIG = "config.json"
HF_SAFETENSORS = "model.safetensors"
HF_SAFETENSORS_INDEX = "model.safetensors.index.json"
QUANTIZED_META = "quantization.json"


class ModelDirError(ValueError):
    """A path that is no model directory lmforge reads; the message is one line."""


def is_run_dir(path: Path) -> bool:
    """Whether `path` holds an lmforge run's config.json (a JSON object with a "model" table)."""
    config = RunDir(Path(path)).config
    if not config.is_file():
        return False
    try:
        d = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(d, dict) and isinstance(d.get("model"), dict)


def model_dir_kind(path: Path | str) -> str:
    """"quantized", "hf", "run" or "checkpoint" (checked in that order: a Hugging Face directory has
    a config.json too); FileNotFoundError for a missing path, ModelDirError for any other."""
    path = Path(path)
    if not path.exists():
        raise no_such_path(path)
    if (path / QUANTIZED_META).is_file():
        return "quantized"
    if (path / HF_CONFIG).is_file() and ((path / HF_SAFETENSORS).is_file() or (path / HF_SAFETENSORS_INDEX).is_file()):
        return "hf"
    if is_run_dir(path):
        return "run"
    if holds_checkpoint(path):
        return "checkpoint"
    raise ModelDirError(f"{path}: not a Hugging Face directory ({HF_CONFIG} + {HF_SAFETENSORS}), an lmforge run "
                        f"directory, a checkpoint step directory or a quantized directory ({QUANTIZED_META})")


def require_hf_dir(path: Path | str) -> Path:
    """`path` when it is a Hugging Face directory (what `lmforge import` reads); FileNotFoundError
    for a missing path, ModelDirError for any other kind."""
    try:
        kind = model_dir_kind(path)
    except ModelDirError:
        kind = None
    if kind != "hf":
        raise ModelDirError(f"{path}: not a Hugging Face directory ({HF_CONFIG} + {HF_SAFETENSORS} or "
                            f"{HF_SAFETENSORS_INDEX})")
    return Path(path)
