"""Rotary position embedding (Su et al., 2021) in the "rotate half" layout, with the long-context
scalings of `model.rope_scaling` (linear, static and dynamic NTK-aware, YaRN, Llama 3).

The first and second halves of each head dimension form the rotated pairs (the layout Hugging
Face Llama checkpoints use), so weights move to and from HF without permuting q/k rows.

The scalings compute what transformers' modeling_rope_utils.py computes for the `rope_scaling`
type of the same name (tests/unit/test_hf_rope.py holds the logits to 1e-5), in float64: a
scaling changes the frequencies (`scaled_inv_freq`) and, for YaRN, multiplies cos and sin by an
attention factor, which scales q.k by its square (a softmax temperature), so the attention
module needs no change.
"""

from __future__ import annotations

import math

import torch

from lmforge.config import ModelConfig, RopeScalingConfig


def _ntk_theta(theta: float, factor: float, head_dim: int) -> float:
    """NTK-aware base change: theta * factor^(d / (d - 2)) stretches the lowest frequency by
    `factor` and leaves the highest (one rotation per position) unchanged."""
    return theta * factor ** (head_dim / (head_dim - 2))


def _yarn_attention_factor(s: RopeScalingConfig) -> float:
    """YaRN's cos/sin factor: given, else 0.1 * mscale * ln(factor) + 1 (a ratio of two such terms
    when both mscale and mscale_all_dim are set, as DeepSeek configs write it)."""
    if s.attention_factor is not None:
        return s.attention_factor

    def m(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    if s.mscale and s.mscale_all_dim:
        return m(s.factor, s.mscale) / m(s.factor, s.mscale_all_dim)
    return m(s.factor)


def scaled_inv_freq(head_dim: int, theta: float, scaling: RopeScalingConfig | None, max_seq_len: int,
                    seq_len: int | None = None, device: torch.device | None = None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies (head_dim // 2,) float64, factor on cos and sin) for `scaling`.
    `seq_len`: the current sequence length, used by "dynamic" only (None: the original length)."""
    s = scaling if scaling is not None else RopeScalingConfig()
    f, d = s.factor, head_dim
    original = s.original_length(max_seq_len)
    if s.type == "ntk":
        theta = _ntk_theta(theta, f, d)
    elif s.type == "dynamic":
        # HF: the NTK base for the factor that stretches `original` to the current length.
        length = max(seq_len if seq_len is not None else original, original)
        theta = _ntk_theta(theta, f * length / original - (f - 1), d)
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d))
    if s.type == "linear":
        return inv_freq / f, 1.0
    if s.type == "llama3":
        # Wavelengths longer than original / low_freq_factor are interpolated (/ factor), those
        # shorter than original / high_freq_factor kept; in between, a linear blend in original / wavelength.
        wavelen = 2 * math.pi / inv_freq
        smooth = (original / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        long_ = wavelen > original / s.low_freq_factor
        short = wavelen < original / s.high_freq_factor
        blended = (1 - smooth) * inv_freq / f + smooth * inv_freq
        return torch.where(long_, inv_freq / f, torch.where(short, inv_freq, blended)), 1.0
    if s.type == "yarn":
        # Dimension index at which a frequency makes `rotations` turns over the original length.
        def dim_at(rotations: float) -> float:
            return d * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = dim_at(s.beta_fast), dim_at(s.beta_slow)
        if s.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, d - 1)
        if low == high:
            high += 0.001  # as HF: no division by zero
        # 0 below `low` (fast dimensions: extrapolate, unchanged), 1 above `high` (interpolate).
        ramp = ((torch.arange(d // 2, dtype=torch.float64, device=device) - low) / (high - low)).clamp(0, 1)
        return inv_freq / f * ramp + inv_freq * (1 - ramp), _yarn_attention_factor(s)
    return inv_freq, 1.0


def rope_cos_sin(head_dim: int, max_seq_len: int, theta: float, device: torch.device | None = None,
                 scaling: RopeScalingConfig | None = None, seq_len: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (max_seq_len, head_dim // 2), fp32, scaled by `scaling`
    (None: plain RoPE); `seq_len` as in `scaled_inv_freq`."""
    inv_freq, attention_factor = scaled_inv_freq(head_dim, theta, scaling, max_seq_len, seq_len, device)
    t = torch.arange(max_seq_len, dtype=torch.float64, device=device)
    angles = torch.outer(t, inv_freq)
    return (angles.cos() * attention_factor).float(), (angles.sin() * attention_factor).float()


def rope_tables(cfg: ModelConfig, device: torch.device | None = None, length: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's cos and sin tables for positions [0, length) (None: max_seq_len). Under
    "dynamic" scaling a `length` beyond the original one gives that length's tables, which is
    what HF computes for a sequence of `length` tokens (the cached tables are the original's)."""
    return rope_cos_sin(cfg.head_dim, length or cfg.max_seq_len, cfg.rope_theta, device, cfg.rope_scaling,
                        seq_len=length)


def dynamic_rope_length(cfg: ModelConfig, end: int) -> int | None:
    """For "dynamic" scaling, the length whose tables positions [0, end) need when `end` is past
    the original length; else None (the cached tables serve)."""
    s = cfg.rope_scaling
    return end if s.type == "dynamic" and end > s.original_length(cfg.max_seq_len) else None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), written into one output: 4 kernels, no cat."""
    x1, x2 = x.chunk(2, dim=-1)
    if torch.compiler.is_compiling():
        # Dynamo cannot trace `out=` into a non-contiguous view: each call would break the graph
        # (and a break inside a tensor-parallel block left DTensor gradients as plain tensors).
        # Inductor fuses this form into one kernel anyway.
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    out = torch.empty_like(x)
    o1, o2 = out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin)
    return out


class _Rope(torch.autograd.Function):
    """A rotation's gradient is its transpose (angle -theta: sin -> -sin; a YaRN attention factor
    on cos and sin stays), so backward needs only the tables, not x, and costs the same four
    kernels as forward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x of shape (batch, seq, heads, head_dim) by per-position angles (seq, head_dim // 2)."""
    cos = cos[:, None, :].to(x.dtype)
    sin = sin[:, None, :].to(x.dtype)
    return _Rope.apply(x, cos, sin)
