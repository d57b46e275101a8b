"""The files of a Hugging Face model directory, family-independent: config.json, safetensors
weights (one file, or shards with an index as `save_pretrained` writes them), the tokenizer
files AutoTokenizer reads, and the atomic output directory an export is written into."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lmforge.interop.hf.base import HFFormatError
from lmforge.storage.atomic import as_if_created, atomic_dir
from lmforge.storage.model_dir import HF_CONFIG, HF_SAFETENSORS, HF_SAFETENSORS_INDEX
from lmforge.storage.strict_json import read_json_object

EOS_TOKEN = "<|endoftext|>"
CONFIG_FILE = HF_CONFIG  # the names a directory is recognised by: storage/model_dir.py
SAFETENSORS_FILE = HF_SAFETENSORS
SAFETENSORS_INDEX = HF_SAFETENSORS_INDEX


def write_json(path: Path, obj: Any) -> None:
    """`obj` as indented JSON with a final newline (the layout `save_pretrained` writes)."""
    path.write_text(json.dumps(obj, indent=2) + "\n")


# -- reading -----------------------------------------------------------------------------------


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    """config.json of `hf_dir` as a dict; HFFormatError when missing, unreadable or not an object."""
    path = Path(hf_dir) / CONFIG_FILE
    if not path.is_file():
        raise HFFormatError(f"{hf_dir}: no config.json; not a Hugging Face model directory")
    return read_json_object(path, HFFormatError)


def read_hf_weights(hf_dir: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors, or of every shard named by model.safetensors.index.json."""
    hf_dir = Path(hf_dir)
    single, index = hf_dir / SAFETENSORS_FILE, hf_dir / SAFETENSORS_INDEX
    if single.is_file():
        files: dict[Path, set[str] | None] = {single: None}
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise HFFormatError(f"{index}: cannot read weight_map ({e.__class__.__name__}: {e})") from None
        files = {}
        for name, fname in weight_map.items():
            files.setdefault(hf_dir / fname, set()).add(name)
    else:
        raise HFFormatError(f"{hf_dir}: no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} "
                            "(only safetensors checkpoints can be imported)")
    out: dict[str, torch.Tensor] = {}
    for path, wanted in files.items():
        if not path.is_file():
            raise HFFormatError(f"{path}: shard named in {SAFETENSORS_INDEX} is missing")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    if wanted is None or name in wanted:
                        out[name] = f.get_tensor(name)
        except OSError:
            raise  # unreadable storage: the CLI names the file and the fault
        except Exception as e:  # noqa: BLE001 (SafetensorError derives from Exception only)
            raise HFFormatError(f"{path}: not a readable safetensors file ({e}); is it truncated or still "
                                "downloading? fetch it again") from None
    return out


# -- writing -----------------------------------------------------------------------------------


def shard_groups(tensors: Mapping[str, torch.Tensor], max_bytes: int | None) -> list[list[str]]:
    """Tensor names split, in order, into groups of at most `max_bytes` each (a tensor larger than
    that gets a group of its own); one group when `max_bytes` is None or everything fits."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if max_bytes is not None and groups[-1] and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    return groups


def save_safetensors(tensors: dict[str, torch.Tensor], d: Path, max_shard_bytes: int | None) -> None:
    """model.safetensors, or model-0000i-of-0000N.safetensors + model.safetensors.index.json (the
    layout `save_pretrained` writes) when the weights exceed `max_shard_bytes`."""
    groups = shard_groups(tensors, max_shard_bytes)
    if len(groups) == 1:
        save_file(tensors, str(d / SAFETENSORS_FILE), metadata={"format": "pt"})
        as_if_created(d / SAFETENSORS_FILE)
        return
    weight_map = {}
    for i, names in enumerate(groups, 1):
        fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: tensors[k] for k in names}, str(d / fname), metadata={"format": "pt"})
        as_if_created(d / fname)
        weight_map.update(dict.fromkeys(names, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_json(d / SAFETENSORS_INDEX, index)


def tokenizer_files(tokenizer_json: Path, max_len: int) -> tuple[dict[str, Any], dict[str, str], int | None]:
    """(tokenizer_config.json, special_tokens_map.json, eos id) for a byte-level BPE tokenizer.json
    whose special token "<|endoftext|>" ends documents (GPT-2 convention: it is both bos and eos)."""
    try:
        tok = json.loads(Path(tokenizer_json).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HFFormatError(f"{tokenizer_json}: cannot read tokenizer ({e.__class__.__name__}: {e})") from None
    added = [t for t in tok.get("added_tokens", []) if isinstance(t, dict) and "id" in t and "content" in t]
    eos = next((t for t in added if t["content"] == EOS_TOKEN), None)
    special_map: dict[str, str] = {}
    tok_cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(t["id"]): {k: t.get(k, False) for k in ("content", "lstrip", "normalized", "rstrip",
                                                         "single_word", "special")}
            for t in added
        },
    }
    if eos is not None:
        special_map = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN}
        tok_cfg.update(special_map)
    return tok_cfg, special_map, (eos["id"] if eos is not None else None)


def write_output_dir(out_dir: Path, write: Callable[[Path], None], overwrite: bool) -> Path:
    """Fill a temp dir beside `out_dir` with `write`, then rename it into place: readers never see
    half an export (lmforge.storage.atomic.atomic_dir). A non-empty `out_dir` is replaced only
    with `overwrite`."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise HFFormatError(f"{out_dir}: already exists and is not empty; choose a new directory or pass --overwrite")
    return atomic_dir(out_dir, write, replace=overwrite)
