"""The Hugging Face form of an int8-quantized model: transformers' own torchao format.

The fp32 model is exported (interop/hf) and loaded by transformers with a `TorchAoConfig` of the
same torchao config lmforge quantized with (Int8WeightOnlyConfig, or Int8DynamicActivationInt8Weight
Config), embeddings and head included, then written with `save_pretrained`: the directory is what
transformers itself writes and reads (safetensors with torchao's flattened tensors, the
quantization_config in config.json). torchao quantizes each row exactly as lmforge did
(Int8Tensor.from_hp, PerRow), so the integers are the same.

int4-weight has no such form here: transformers loads GPTQ checkpoints only through gptqmodel /
optimum kernels, and torchao's int4 CPU layout re-derives its own grid from the weights, which
would discard GPTQ's error-corrected codes (HF_UNSUPPORTED says so in one line).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from lmforge.compress.errors import CompressError
from lmforge.compress.torchao_import import IMPORT_NOTICE_LOGGERS, loggers_silenced, torchao_quantization
from lmforge.config import ModelConfig
from lmforge.interop.hf.exporter import export_hf

HF_SCHEMES = ("int8-weight", "int8-dynamic")
HF_UNSUPPORTED = ("--hf: int4-weight has no Hugging Face format transformers can load on CPU from PyPI packages "
                  "alone (GPTQ checkpoints need gptqmodel/optimum kernels; torchao's int4 CPU layout re-derives its "
                  "own grid, losing GPTQ's codes); nothing was written: rerun without --hf for the lmforge directory")


LINEAR_MODULES = r"re:.+_proj|lm_head"  # the Linear modules of a Hugging Face decoder, by name


@contextmanager
def transformers_quiet() -> Iterator[None]:
    """transformers' loading and writing progress bars off, and torch's notices on torchao's enums
    (which transformers imports) muted: lmforge prints its own one-line summary."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with loggers_silenced(IMPORT_NOTICE_LOGGERS):
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def torchao_config(scheme: str):
    tq = torchao_quantization()
    return tq.Int8WeightOnlyConfig() if scheme == "int8-weight" else tq.Int8DynamicActivationInt8WeightConfig()


def export_hf_quantized(model: torch.nn.Module, cfg: ModelConfig, scheme: str, out_dir: Path,
                        tokenizer_json: Path | None) -> None:
    """Write the transformers + torchao form of `model` (fp32, unquantized) into the new `out_dir`."""
    if scheme not in HF_SCHEMES:
        raise CompressError(HF_UNSUPPORTED)
    tq = torchao_quantization()
    staging = out_dir.with_name(out_dir.name + ".fp32")
    try:
        export_hf(model, cfg, staging, tokenizer_json)
        # The embedding is a lookup: weight-only int8 whatever the scheme (as lmforge stores it).
        # Every Linear is a *_proj or the head (a regex key: torchao deprecates "_default").
        quant = tq.FqnToConfig({"model.embed_tokens": tq.Int8WeightOnlyConfig(),
                                LINEAR_MODULES: torchao_config(scheme)})
        with transformers_quiet():
            from transformers import AutoModelForCausalLM, TorchAoConfig

            qcfg = TorchAoConfig(quant_type=quant, include_input_output_embeddings=True)
            hf = AutoModelForCausalLM.from_pretrained(staging, quantization_config=qcfg, dtype=torch.float32)
            hf.save_pretrained(out_dir, safe_serialization=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
            if (staging / name).is_file() and not (out_dir / name).is_file():
                shutil.copyfile(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
