"""Hugging Face Llama interop: config.json, safetensors weights and tokenizer files, both ways.

The state-dict adapter is a pure rename: our RoPE uses the "rotate half" layout that HF Llama
checkpoints use, so q/k rows need no permutation (the logits tests in tests/unit/test_hf.py hold
that to 1e-5). `transformers` is not needed here: we read and write the files ourselves, so an
export works where only torch and safetensors are installed.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lmforge.config import ConfigError, ModelConfig
from lmforge.models.common.rope import rope_cos_sin
from lmforge.models.llama.model import Transformer
from lmforge.storage.atomic import as_if_created, atomic_dir

EOS_TOKEN = "<|endoftext|>"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Name parts that wrappers (torch.compile, activation checkpointing, DDP) add to parameter names.
_WRAPPER_PARTS = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "module"})

# ours -> HF, for the names inside one transformer block.
_LAYER_RENAMES = {
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
_TOP_RENAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RENAMES_BACK = {v: k for k, v in _LAYER_RENAMES.items()}
_TOP_RENAMES_BACK = {v: k for k, v in _TOP_RENAMES.items()}
_OUR_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Buffers some older HF checkpoints store; they are recomputed from the config.
_HF_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


class HFFormatError(ValueError):
    """A Hugging Face directory or config we cannot read or represent; the message is one line."""


def _names(keys: Any, limit: int = 6) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# -- config ------------------------------------------------------------------------------------


def to_hf_config(cfg: ModelConfig, eos_token_id: int | None = None, bos_token_id: int | None = None,
                 dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A LlamaConfig-compatible config.json dict. RoPE is written both as `rope_theta`
    (transformers 4.x) and as `rope_parameters` (5.x), so either version reads it. An MoE config
    becomes a Mixtral or Qwen2-MoE config (lmforge.models.moe_hf)."""
    if cfg.moe.n_experts:
        from lmforge.models.moe_hf import to_hf_moe_config
        return to_hf_moe_config(cfg, eos_token_id, bos_token_id, dtype)
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            **decoder_hf_config(cfg, eos_token_id, bos_token_id, dtype),
            "intermediate_size": cfg.ffn_hidden_size, "attention_bias": False, "mlp_bias": False,
            "pretraining_tp": 1}


def decoder_hf_config(cfg: ModelConfig, eos_token_id: int | None, bos_token_id: int | None,
                      dtype: torch.dtype) -> dict[str, Any]:
    """The config.json keys every exported family shares (sizes, heads, norm, RoPE, tokens, dtype)."""
    if dtype not in _DTYPE_NAMES:
        raise HFFormatError(f"export dtype {dtype} is not supported; allowed: {', '.join(_DTYPE_NAMES.values())}")
    return {
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "max_position_embeddings": cfg.max_seq_len,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "torch_dtype": _DTYPE_NAMES[dtype],
    }


def _rope_settings(d: Mapping[str, Any]) -> tuple[list[str], float]:
    """(RoPE types named, theta) from the 4.x keys (rope_theta, rope_scaling) and 5.x rope_parameters."""
    types, theta = [], d.get("rope_theta")
    for key in ("rope_parameters", "rope_scaling"):
        params = d.get(key)
        if not params:
            continue
        if not isinstance(params, Mapping) or any(isinstance(v, Mapping) for v in params.values()):
            raise HFFormatError(f"config.json: {key} = {params!r}: only one global RoPE table is supported")
        types.append(str(params.get("rope_type", params.get("type", "default"))))
        theta = params.get("rope_theta", theta)
    return types, float(theta if theta is not None else 10000.0)


def from_hf_config(d: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig from a config.json dict: Llama here, Mixtral and Qwen2-MoE by `model_type` in
    lmforge.models.moe_hf. Refuses, in one line, what our model cannot represent (RoPE scaling,
    biases, other activations, a head_dim that is not hidden/heads, other families)."""
    model_type = d.get("model_type")
    archs = d.get("architectures") or []
    if model_type in ("mixtral", "qwen2_moe"):
        from lmforge.models.moe_hf import from_hf_moe_config
        return from_hf_moe_config(d)
    if model_type != "llama" and "LlamaForCausalLM" not in archs:
        raise HFFormatError(f"config.json: model_type = {model_type!r}: only Llama, Mixtral and Qwen2-MoE "
                            "models (model_type 'llama', 'mixtral', 'qwen2_moe') can be imported")
    for key in ("attention_bias", "mlp_bias"):
        if d.get(key, False):
            raise HFFormatError(f"config.json: {key} = {d.get(key)!r}: biases are not supported; must be false")
    return checked_config(ModelConfig(**decoder_fields(d)))


def decoder_fields(d: Mapping[str, Any], ffn_key: str = "intermediate_size") -> dict[str, Any]:
    """ModelConfig fields every supported family shares (sizes, heads, norm, RoPE, tying), checked;
    the dense SwiGLU width is read from `ffn_key`."""
    def bad(key: str, allowed: str) -> HFFormatError:
        return HFFormatError(f"config.json: {key} = {d.get(key)!r}: {allowed}")

    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", ffn_key, "vocab_size"):
        if not isinstance(d.get(key), int) or isinstance(d.get(key), bool) or d[key] <= 0:
            raise bad(key, "must be a positive integer")
    dim, n_heads = d["hidden_size"], d["num_attention_heads"]
    if dim % n_heads:
        raise bad("num_attention_heads", f"must divide hidden_size ({dim})")
    if d.get("head_dim") is not None and d["head_dim"] != dim // n_heads:
        raise bad("head_dim", f"only hidden_size / num_attention_heads ({dim // n_heads}) is supported")
    if d.get("hidden_act", "silu") not in ("silu", "swish"):
        raise bad("hidden_act", "only 'silu' (SwiGLU) is supported")
    rope_types, theta = _rope_settings(d)
    for rope_type in rope_types:
        if rope_type != "default":
            raise HFFormatError(f"config.json: RoPE type {rope_type!r} is not supported; only 'default' "
                                "(no rope_scaling) can be imported")
    if d.get("partial_rotary_factor", 1.0) not in (1, 1.0, None):
        raise bad("partial_rotary_factor", "only 1.0 (full rotary) is supported")
    n_kv = d.get("num_key_value_heads") or n_heads
    return dict(
        dim=dim,
        n_layers=d["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=None if n_kv == n_heads else n_kv,
        vocab_size=d["vocab_size"],
        ffn_hidden=d[ffn_key],
        norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        max_seq_len=int(d.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        init_std=float(d.get("initializer_range", 0.02)),
    )


def checked_config(cfg: ModelConfig) -> ModelConfig:
    try:
        cfg.validate()
    except ConfigError as e:
        raise HFFormatError(f"config.json cannot be represented: {e}") from None
    return cfg


# -- state dict --------------------------------------------------------------------------------


def _strip_wrappers(name: str) -> str:
    return ".".join(p for p in name.split(".") if p not in _WRAPPER_PARTS)


def to_hf_state_dict(sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our names -> HF names. With tied embeddings HF stores no lm_head.weight, so it is dropped."""
    if cfg.moe.n_experts:
        from lmforge.models.moe_hf import to_hf_moe_state_dict
        return to_hf_moe_state_dict(sd, cfg)
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        name = _strip_wrappers(name)
        if cfg.tie_embeddings and name == "output.weight":
            continue
        if name in _TOP_RENAMES:
            out[_TOP_RENAMES[name]] = t
            continue
        m = _OUR_LAYER.match(name)
        if m is None or m.group(2) not in _LAYER_RENAMES:
            raise HFFormatError(f"parameter {name!r} has no Hugging Face Llama equivalent")
        out[f"model.layers.{m.group(1)}.{_LAYER_RENAMES[m.group(2)]}"] = t
    return out


def from_hf_state_dict(sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF names -> our names. Drops lm_head.weight when tied (some exports keep it) and stored
    rotary inv_freq buffers; any other unknown name is an error naming it."""
    if cfg.moe.n_experts:
        from lmforge.models.moe_hf import from_hf_moe_state_dict
        return from_hf_moe_state_dict(sd, cfg)
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for name, t in sd.items():
        if _HF_IGNORED.search(name) or (cfg.tie_embeddings and name == "lm_head.weight"):
            continue
        if name in _TOP_RENAMES_BACK:
            out[_TOP_RENAMES_BACK[name]] = t
            continue
        m = _HF_LAYER.match(name)
        if m is None or m.group(2) not in _LAYER_RENAMES_BACK:
            unknown.append(name)
            continue
        out[f"layers.{m.group(1)}.{_LAYER_RENAMES_BACK[m.group(2)]}"] = t
    if unknown:
        raise HFFormatError(f"unexpected weights for a Llama model: {_names(unknown)}")
    return out


# -- export ------------------------------------------------------------------------------------


def _plain_tensor(t: torch.Tensor) -> torch.Tensor:
    full = getattr(t, "full_tensor", None)  # DTensor (FSDP2 / TP): gather the whole tensor
    return full() if callable(full) else t


def _tokenizer_files(tokenizer_json: Path, max_len: int) -> tuple[dict, dict, int | None]:
    """tokenizer_config.json and special_tokens_map.json for a byte-level BPE tokenizer.json whose
    special token "<|endoftext|>" ends documents (GPT-2 convention: it is both bos and eos)."""
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


def _atomic_dir(out_dir: Path, write: Any, overwrite: bool) -> Path:
    """Fill a temp dir beside `out_dir`, then rename it into place: readers never see half an export
    (lmforge.storage.atomic.atomic_dir). A non-empty `out_dir` is replaced only with `overwrite`."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise HFFormatError(f"{out_dir}: already exists and is not empty; choose a new directory or pass --overwrite")
    return atomic_dir(out_dir, write, replace=overwrite)


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


def _save_safetensors(tensors: dict[str, torch.Tensor], d: Path, max_shard_bytes: int | None) -> None:
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
    (d / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def export_hf(model: torch.nn.Module, cfg: ModelConfig, out_dir: Path, tokenizer_json: Path | None = None,
              dtype: torch.dtype = torch.float32, overwrite: bool = False,
              max_shard_bytes: int | None = None) -> Path:
    """Write a directory `transformers.AutoModelForCausalLM.from_pretrained` loads (Llama, or for
    an MoE model Mixtral / Qwen2-MoE, named in `architectures`): config.json,
    model.safetensors, generation_config.json, and with a tokenizer tokenizer.json,
    tokenizer_config.json, special_tokens_map.json (AutoTokenizer loads it). Weights above
    `max_shard_bytes` are split into shards with an index (big MoE models). Atomic."""
    eos_id = None
    tok_files = None
    if tokenizer_json is not None:
        tok_files = _tokenizer_files(Path(tokenizer_json), cfg.max_seq_len)
        eos_id = tok_files[2]
    hf_cfg = to_hf_config(cfg, eos_token_id=eos_id, bos_token_id=eos_id, dtype=dtype)
    sd = to_hf_state_dict(model.state_dict(), cfg)
    # safetensors refuses shared or non-contiguous storage: give each tensor its own contiguous copy.
    tensors = {k: _plain_tensor(v).detach().to(device="cpu", dtype=dtype).contiguous().clone()
               for k, v in sd.items()}

    def write(d: Path) -> None:
        _save_safetensors(tensors, d, max_shard_bytes)
        (d / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        gen = {"_from_model_config": True, "bos_token_id": eos_id, "eos_token_id": eos_id}
        (d / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if tok_files is not None:
            shutil.copyfile(tokenizer_json, d / "tokenizer.json")
            (d / "tokenizer_config.json").write_text(json.dumps(tok_files[0], indent=2) + "\n")
            (d / "special_tokens_map.json").write_text(json.dumps(tok_files[1], indent=2) + "\n")

    return _atomic_dir(Path(out_dir), write, overwrite)


# -- import ------------------------------------------------------------------------------------


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise HFFormatError(f"{hf_dir}: no config.json; not a Hugging Face model directory")
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HFFormatError(f"{path}: cannot read ({e.__class__.__name__}: {e})") from None
    if not isinstance(d, dict):
        raise HFFormatError(f"{path}: must hold a JSON object")
    return d


def is_hf_dir(path: Path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and (
        (path / SAFETENSORS_FILE).is_file() or (path / SAFETENSORS_INDEX).is_file())


def read_hf_weights(hf_dir: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors, or of every shard named by model.safetensors.index.json."""
    hf_dir = Path(hf_dir)
    single, index = hf_dir / SAFETENSORS_FILE, hf_dir / SAFETENSORS_INDEX
    if single.is_file():
        files = {single: None}
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
        model = Transformer(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()
                if not (cfg.tie_embeddings and k == "output.weight")}
    missing = [hf_name(k) for k in expected if k not in sd]
    if missing:
        raise HFFormatError(f"{hf_dir}: missing weights: {_names(missing)}")
    wrong = [f"{hf_name(k)} {tuple(sd[k].shape)} != {tuple(s)}" for k, s in expected.items() if sd[k].shape != s]
    if wrong:
        raise HFFormatError(f"{hf_dir}: weight shapes do not match config.json: {_names(wrong, 3)}")
    result = model.load_state_dict(sd, strict=False, assign=True)
    leftover = set(result.missing_keys) - {"output.weight"} if cfg.tie_embeddings else set(result.missing_keys)
    if leftover or result.unexpected_keys:  # cannot happen after the checks above; keep the guarantee
        raise HFFormatError(f"{hf_dir}: weights do not fit: missing {_names(leftover)}, "
                            f"unexpected {_names(result.unexpected_keys)}")
    model.tie_weights()
    cos, sin = rope_cos_sin(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, torch.device(device))
    model.rope_cos, model.rope_sin = cos, sin
    return model, cfg


def hf_name(ours: str) -> str:
    """HF name of one of our parameter names (for error messages)."""
    if ours in _TOP_RENAMES:
        return _TOP_RENAMES[ours]
    m = _OUR_LAYER.match(ours)
    if m and m.group(2) in _LAYER_RENAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_RENAMES[m.group(2)]}"
    return ours
