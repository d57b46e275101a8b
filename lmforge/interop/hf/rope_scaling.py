"""RoPE settings <-> Hugging Face config.json: `rope_theta` and `rope_scaling` (transformers 4.x)
and `rope_parameters` (5.x), for every family.

HF types and ours (lmforge/config/model.py: RopeScalingConfig) are the same math
(lmforge/models/common/rope.py; logits held to 1e-5 by tests/unit/test_hf_rope.py):

    HF rope_type   ours          notes
    default        none
    linear         linear
    dynamic        dynamic       HF max_position_embeddings is the original length; on import our
                                 max_seq_len is factor x that (the reach the factor names)
    yarn           yarn          original_max_position_embeddings (top-level key first, as HF)
    llama3         llama3
    (none)         ntk           static NTK is plain RoPE with a larger base: written as
                                 rope_theta' = theta * factor^(d / (d - 2)), read back as "none"

Any other type (longrope, proportional, per-layer tables) is refused in one line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from lmforge.config import ModelConfig, RopeScalingConfig
from lmforge.interop.hf.base import HFFormatError

HF_TYPES = {"default": "none", "linear": "linear", "dynamic": "dynamic", "yarn": "yarn", "llama3": "llama3"}


def rope_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json RoPE keys for `cfg`: rope_theta and max_position_embeddings, rope_parameters
    (5.x) and, when scaled, rope_scaling (4.x; 5.x prefers it, and it says the same)."""
    s, theta, max_positions = cfg.rope_scaling, cfg.rope_theta, cfg.max_seq_len
    params: dict[str, Any] = {"rope_type": "default"}
    if s.type == "ntk":
        theta = theta * s.factor ** (cfg.head_dim / (cfg.head_dim - 2))
    elif s.type in ("linear", "dynamic"):
        params = {"rope_type": s.type, "factor": s.factor}
        if s.type == "dynamic":
            max_positions = s.original_length(cfg.max_seq_len)  # HF scales past max_position_embeddings
    elif s.type == "llama3":
        params = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                  "high_freq_factor": s.high_freq_factor,
                  "original_max_position_embeddings": s.original_length(cfg.max_seq_len)}
    elif s.type == "yarn":
        params = {"rope_type": "yarn", "factor": s.factor,
                  "original_max_position_embeddings": s.original_length(cfg.max_seq_len),
                  "beta_fast": s.beta_fast, "beta_slow": s.beta_slow, "truncate": s.truncate}
        if s.attention_factor is not None:
            params["attention_factor"] = s.attention_factor
        if s.mscale and s.mscale_all_dim:  # HF uses them only together
            params.update(mscale=s.mscale, mscale_all_dim=s.mscale_all_dim)
    out = {"rope_theta": theta, "rope_parameters": {**params, "rope_theta": theta},
           "max_position_embeddings": max_positions}
    if params["rope_type"] != "default":
        out["rope_scaling"] = params
    return out


def _number(params: Mapping[str, Any], key: str, default: float | None = None) -> float | None:
    v = params.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise HFFormatError(f"config.json: RoPE {key} = {v!r}: must be a finite number")
    return float(v)


def rope_fields(d: Mapping[str, Any]) -> dict[str, Any]:
    """ModelConfig fields rope_theta, rope_scaling and max_seq_len from a config.json dict (4.x
    rope_theta + rope_scaling, or 5.x rope_parameters; rope_scaling wins, as in transformers 5.x).
    Refuses, in one line, per-layer tables and types we do not compute."""
    for key in ("rope_parameters", "rope_scaling"):
        p = d.get(key)
        if p and (not isinstance(p, Mapping) or any(isinstance(v, Mapping) for v in p.values())):
            raise HFFormatError(f"config.json: {key} = {p!r}: only one global RoPE table is supported")
    # transformers 5.x: rope_scaling, when given, replaces rope_parameters whole; rope_theta inside
    # the dict wins over the top-level key (4.x reads only rope_theta and rope_scaling).
    params = d.get("rope_scaling") or d.get("rope_parameters") or {}
    theta = params.get("rope_theta", d.get("rope_theta"))
    max_positions = int(d.get("max_position_embeddings", 2048))
    hf_type = str(params.get("rope_type", params.get("type", "default")))
    if hf_type not in HF_TYPES:
        raise HFFormatError(f"config.json: RoPE type {hf_type!r} is not supported; only "
                            f"{', '.join(repr(t) for t in HF_TYPES)} can be imported")
    if _number(params, "partial_rotary_factor", 1.0) != 1.0:
        raise HFFormatError(f"config.json: rope partial_rotary_factor = {params['partial_rotary_factor']!r}: "
                            "only 1.0 (full rotary) is supported")
    theta = float(theta if theta is not None else 10000.0)
    s, max_seq_len = RopeScalingConfig(type=HF_TYPES[hf_type]), max_positions
    if hf_type == "default":
        return dict(rope_theta=theta, rope_scaling=s, max_seq_len=max_seq_len)
    # HF: a top-level original_max_position_embeddings wins (Phi-3 style); default: max_position_embeddings.
    original = d.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
    original = int(original) if original else max_positions
    factor = _number(params, "factor")
    if factor is None and hf_type == "yarn":
        factor = max_positions / original  # HF's default (DeepSeek-V3 configs)
    if factor is None:
        raise HFFormatError(f"config.json: RoPE type {hf_type!r} needs a factor")
    s.factor = factor
    if hf_type == "dynamic":
        s.original_max_seq_len = max_positions
        max_seq_len = max(max_positions, int(factor * max_positions))
    elif hf_type == "llama3":
        s.original_max_seq_len = original
        for key in ("low_freq_factor", "high_freq_factor"):
            if (v := _number(params, key)) is None:
                raise HFFormatError(f"config.json: RoPE type 'llama3' needs {key}")
            setattr(s, key, v)
    elif hf_type == "yarn":
        s.original_max_seq_len = original
        s.beta_fast = _number(params, "beta_fast") or 32.0  # HF: `or` (0 means the default too)
        s.beta_slow = _number(params, "beta_slow") or 1.0
        s.attention_factor = _number(params, "attention_factor")
        s.mscale = _number(params, "mscale") or 0.0
        s.mscale_all_dim = _number(params, "mscale_all_dim") or 0.0
        s.truncate = bool(params.get("truncate", True))
    return dict(rope_theta=theta, rope_scaling=s, max_seq_len=max_seq_len)
