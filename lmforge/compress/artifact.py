"""A quantized model directory: everything `lmforge eval` and `lmforge generate` need, with no flag.

    quantization.json            format version, scheme, runtime, group size, each weight's format,
                                 provenance (source path and checkpoint step, calibration data
                                 manifest sha256 and windows), per-weight error report
    run_config.json              the source run's config (model, data.dir made absolute, train.seq_len
                                 and batch sizes): what eval reads for held-out data and windows
    model.quantized.safetensors  the tensors (int8 rows, packed int4 + fp16 scales + uint8 zeros, fp32 rest)
    tokenizer.json               the source's tokenizer (when it has one)
    hf/                          with --hf: the Hugging Face form (transformers + torchao), int8 schemes

Written whole, temp then rename (storage/atomic.py atomic_dir). Not named config.json +
model.safetensors, so nothing mistakes it for a Hugging Face directory or an lmforge run.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lmforge.compress.errors import CompressError
from lmforge.compress.quantize import QuantizedWeights
from lmforge.compress.runtime import checked_runtime_model, int8_runtime_problem
from lmforge.compress.schemes import RUNTIMES, SCHEMES, resolve_runtime
from lmforge.config import ModelConfig
from lmforge.config.loader import ConfigError, build_dataclass
from lmforge.storage.atomic import as_if_created, atomic_dir
from lmforge.storage.model_dir import QUANTIZED_META
from lmforge.storage.strict_json import dumps_strict as strict_dumps
from lmforge.storage.strict_json import read_json_object

FORMAT = 1
META = QUANTIZED_META  # the name a quantized directory is recognised by (storage/model_dir.py)
RUN_CONFIG = "run_config.json"
TENSORS = "model.quantized.safetensors"
TOKENIZER = "tokenizer.json"
HF_SUBDIR = "hf"


@dataclass(frozen=True)
class QuantizedDir:
    """A quantized directory read back: its metadata, run config and model config."""

    path: Path
    meta: dict
    run_config: dict
    cfg: ModelConfig

    @property
    def scheme(self) -> str:
        return str(self.meta["scheme"])

    @property
    def tokenizer(self) -> Path | None:
        tok = self.path / TOKENIZER
        return tok if tok.is_file() else None


def write_quantized(out_dir: Path, weights: QuantizedWeights, meta: dict, run_config: dict,
                    tokenizer_json: Path | None, replace: bool,
                    extra: Callable[[Path], None] | None = None) -> Path:
    """Write the directory whole (temp beside it, then renamed); `extra(tmp)` adds more (the hf/ form)."""
    meta = {"format": FORMAT, **meta, "weights": weights.formats, "report": weights.report}

    def fill(d: Path) -> None:
        save_file(weights.tensors, str(d / TENSORS), metadata={"format": "pt", "lmforge": "quantized"})
        as_if_created(d / TENSORS)
        (d / RUN_CONFIG).write_text(strict_dumps(run_config, indent=1))
        if tokenizer_json is not None:
            shutil.copyfile(tokenizer_json, d / TOKENIZER)
        if extra is not None:
            extra(d)
        (d / META).write_text(strict_dumps(meta, indent=1))  # last: its presence marks a complete directory

    return atomic_dir(Path(out_dir), fill, replace=replace)


def _read_json(path: Path) -> dict:
    return read_json_object(path, CompressError)


def read_quantized(path: Path) -> QuantizedDir:
    """The directory's metadata and configs, checked (not the tensors yet)."""
    path = Path(path)
    meta = _read_json(path / META)
    if meta.get("format") != FORMAT:
        raise CompressError(f"{path / META}: format {meta.get('format')!r}; this lmforge reads format {FORMAT}")
    if meta.get("scheme") not in SCHEMES:
        raise CompressError(f"{path / META}: scheme {meta.get('scheme')!r} is not one of {', '.join(SCHEMES)}")
    if meta.get("runtime") not in RUNTIMES[meta["scheme"]]:
        raise CompressError(f"{path / META}: runtime {meta.get('runtime')!r} cannot run {meta['scheme']}")
    if not isinstance(meta.get("weights"), dict):
        raise CompressError(f"{path / META}: no 'weights' table")
    run_config = _read_json(path / RUN_CONFIG)
    if not isinstance(run_config.get("model"), dict):
        raise CompressError(f"{path / RUN_CONFIG}: no 'model' table")
    try:
        cfg = build_dataclass(ModelConfig, run_config["model"], "model.", where=str(path / RUN_CONFIG))
        cfg.validate()
    except ConfigError as e:
        raise CompressError(str(e)) from None
    if not (path / TENSORS).is_file():
        raise CompressError(f"{path}: {TENSORS} is missing (an incomplete quantized directory); quantize again")
    return QuantizedDir(path, meta, run_config, cfg)


def load_quantized(path: Path, device: torch.device | str = "cpu", runtime: str | None = None,
                   dequantize: bool = False) -> tuple[torch.nn.Module, ModelConfig, Path | None]:
    """(model in eval mode, its config, tokenizer.json or None); `runtime` overrides the recorded one.
    `dequantize`: plain fp32 weights equal to the stored numbers (q * scale), whatever the scheme, for
    exporters that write ordinary weights (int8-dynamic's activation quantization is a runtime choice,
    not part of the weights)."""
    q = read_quantized(path)
    chosen = "dequant" if dequantize else resolve_runtime(q.scheme, runtime or q.meta["runtime"])
    problem = int8_runtime_problem(q.scheme, chosen, device)
    if problem is not None:  # before reading the tensors
        if runtime is None:
            raise CompressError(f"{q.path}: its recorded {problem}; quantize again with --runtime fbgemm (or auto)")
        raise CompressError(f"{q.path}: {problem}; use runtime fbgemm")
    try:
        tensors = load_file(str(q.path / TENSORS))
    except (SafetensorError, OSError) as e:
        raise CompressError(f"{q.path / TENSORS}: cannot read ({e.__class__.__name__}: {e}); quantize again") from None
    try:
        model = checked_runtime_model(q.cfg, q.meta["weights"], tensors, q.scheme, chosen, device)
    except KeyError as e:
        raise CompressError(f"{q.path / TENSORS}: tensor {e} is missing; quantize again") from None
    return model, q.cfg, q.tokenizer
