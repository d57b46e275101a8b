"""Export: an lmforge model -> a directory `transformers.AutoModelForCausalLM.from_pretrained`
loads (and with a tokenizer, AutoTokenizer too)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from lmforge.config import ModelConfig
from lmforge.interop.hf.io import (
    CONFIG_FILE,
    save_safetensors,
    tokenizer_files,
    write_json,
    write_output_dir,
)
from lmforge.interop.hf.registry import to_hf_config, to_hf_state_dict
from lmforge.tensors.dtensor import gathered


def export_hf(model: torch.nn.Module, cfg: ModelConfig, out_dir: Path, tokenizer_json: Path | None = None,
              dtype: torch.dtype = torch.float32, overwrite: bool = False,
              max_shard_bytes: int | None = None) -> Path:
    """Write `out_dir` as the family the registry picks (Llama, or for an MoE model Mixtral /
    Qwen2-MoE, named in `architectures`): config.json, model.safetensors,
    generation_config.json, and with a tokenizer tokenizer.json, tokenizer_config.json,
    special_tokens_map.json (AutoTokenizer loads it). Weights above `max_shard_bytes` are split
    into shards with an index (big MoE models). Atomic."""
    eos_id = None
    tok_files = None
    if tokenizer_json is not None:
        tok_files = tokenizer_files(Path(tokenizer_json), cfg.max_seq_len)
        eos_id = tok_files[2]
    hf_cfg = to_hf_config(cfg, eos_token_id=eos_id, bos_token_id=eos_id, dtype=dtype)
    sd = to_hf_state_dict(model.state_dict(), cfg)
    # safetensors refuses shared or non-contiguous storage: give each tensor its own contiguous copy.
    tensors = {k: gathered(v).detach().to(device="cpu", dtype=dtype).contiguous().clone()
               for k, v in sd.items()}

    def write(d: Path) -> None:
        save_safetensors(tensors, d, max_shard_bytes)
        write_json(d / CONFIG_FILE, hf_cfg)
        write_json(d / "generation_config.json",
                   {"_from_model_config": True, "bos_token_id": eos_id, "eos_token_id": eos_id})
        if tok_files is not None:
            shutil.copyfile(tokenizer_json, d / "tokenizer.json")
            write_json(d / "tokenizer_config.json", tok_files[0])
            write_json(d / "special_tokens_map.json", tok_files[1])

    return write_output_dir(Path(out_dir), write, overwrite)
