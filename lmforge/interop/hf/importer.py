"""Import: a Hugging Face directory -> our Transformer (`import_hf`, what generate loads), or ->
an lmforge run directory (`import_to_run`), so every command that takes a run (generate,
export, eval) takes an imported model too:

    <out>/config.json                      the JobConfig as JSON, model section from config.json
    <out>/tokenizer.json                   copied when the HF directory has one
    <out>/checkpoints/step-00000000/       weights-only checkpoint (DCP, top-level key "model", manifest)
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from lmforge.checkpoint.weights_run import write_weights_run
from lmforge.config import JobConfig, ModelConfig, TokenizerConfig, TrainConfig
from lmforge.interop.hf.base import HFFormatError, name_list
from lmforge.interop.hf.io import read_hf_config, read_hf_weights
from lmforge.interop.hf.llama import hf_name
from lmforge.interop.hf.registry import from_hf_config, from_hf_state_dict
from lmforge.models.common.rope import rope_tables
from lmforge.models.llama.model import Transformer
from lmforge.models.registry import family_of
from lmforge.storage.guard import DestinationError, check_destination


def import_hf(hf_dir: Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
              ) -> tuple[Transformer, ModelConfig]:
    """Build our Transformer from a HF Llama, Mixtral or Qwen2-MoE directory (config.json +
    safetensors, sharded or not).
    The model is built on meta and the loaded tensors are assigned, so weights are never held twice.
    `dtype=None` keeps the stored dtype."""
    cfg = from_hf_config(read_hf_config(hf_dir))
    sd = from_hf_state_dict(read_hf_weights(hf_dir, device), cfg)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    with torch.device("meta"):
        model = family_of(cfg).model_class(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()
                if not (cfg.tie_embeddings and k == "output.weight")}
    missing = [hf_name(k) for k in expected if k not in sd]
    if missing:
        raise HFFormatError(f"{hf_dir}: missing weights: {name_list(missing)}")
    wrong = [f"{hf_name(k)} {tuple(sd[k].shape)} != {tuple(s)}" for k, s in expected.items() if sd[k].shape != s]
    if wrong:
        raise HFFormatError(f"{hf_dir}: weight shapes do not match config.json: {name_list(wrong, 3)}")
    result = model.load_state_dict(sd, strict=False, assign=True)
    leftover = set(result.missing_keys) - {"output.weight"} if cfg.tie_embeddings else set(result.missing_keys)
    if leftover or result.unexpected_keys:  # cannot happen after the checks above; keep the guarantee
        raise HFFormatError(f"{hf_dir}: weights do not fit: missing {name_list(leftover)}, "
                            f"unexpected {name_list(result.unexpected_keys)}")
    model.tie_weights()
    cos, sin = rope_tables(cfg, torch.device(device))
    model.rope_cos, model.rope_sin = cos, sin
    return model, cfg


def import_to_run(hf_dir: Path, out: Path, overwrite: bool = False) -> Path:
    """Import `hf_dir` (fp32 weights) as a new run directory `out`; returns the checkpoint step dir.
    Refuses an existing non-empty `out` unless `overwrite`, and always an `out` that overlaps
    `hf_dir` (lmforge.storage.guard); written whole into a temp dir, then renamed."""
    hf_dir, out = Path(hf_dir), Path(out)
    try:
        check_destination(out, overwrite, sources={"Hugging Face directory": hf_dir})
    except DestinationError as e:
        raise HFFormatError(str(e)) from None
    model, cfg = import_hf(hf_dir, "cpu", dtype=torch.float32)
    job = JobConfig(model=cfg,
                    tokenizer=TokenizerConfig(vocab_size=cfg.vocab_size),
                    train=TrainConfig(output_dir=str(out), seq_len=min(TrainConfig.seq_len, cfg.max_seq_len)))

    return write_weights_run(out, model, asdict(job), hf_dir / "tokenizer.json", overwrite)
