"""Group-wise asymmetric 4-bit weights: the number format the int4 scheme stores and its runtimes read.

A weight (out, in) is cut along `in` into groups of `group_size` columns; each (row, group) has a
scale (stored fp16) and an integer zero point in [0, 15]: w ~ scale * (q - zero), q in [0, 15]
(GPTQ's min/max grid: the group's min and max map onto the ends). Scales are rounded to fp16
*before* any value is quantized, so what is stored is exactly what was computed with. Two 4-bit
values share a byte (column 2j in the low nibble, 2j+1 in the high one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QMAX = 15


@dataclass(frozen=True)
class GroupGrid:
    """The scales (rows, groups) and integer zero points (rows, groups) of a weight's groups."""

    scale: torch.Tensor  # fp32 holding fp16-representable values
    zero: torch.Tensor  # fp32 holding integers in [0, 15]


def grid_for(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per row of `w` (rows, cols) over all its columns: min/max mapped to 0/15."""
    lo = w.amin(dim=1).clamp(max=0)
    hi = w.amax(dim=1).clamp(min=0)
    flat = hi == lo
    lo, hi = torch.where(flat, lo - 1, lo), torch.where(flat, hi + 1, hi)
    scale = ((hi - lo) / QMAX).half().float()  # stored in fp16: quantize with the stored value
    scale = torch.where(scale == 0, torch.full_like(scale, torch.finfo(torch.float16).tiny), scale)
    zero = torch.round(-lo / scale).clamp(0, QMAX)
    return scale, zero


def quantize_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Integer codes (as float) of `w` on the grid (scale, zero), broadcast along the last dim."""
    return torch.clamp(torch.round(w / scale) + zero, 0, QMAX)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """(rows, cols) codes + (rows, groups) grids -> fp32 weights."""
    rows, cols = q.shape
    g = q.float().reshape(rows, cols // group_size, group_size)
    return ((g - zero.float()[..., None]) * scale.float()[..., None]).reshape(rows, cols)


def rtn_codes(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, GroupGrid]:
    """Round-to-nearest codes of `w` per group (no calibration): the baseline GPTQ improves on."""
    rows, cols = w.shape
    g = w.float().reshape(rows * (cols // group_size), group_size)
    scale, zero = grid_for(g)
    q = quantize_column(g, scale[:, None], zero[:, None]).reshape(rows, cols)
    return q.to(torch.uint8), GroupGrid(scale.reshape(rows, -1), zero.reshape(rows, -1))


def pack(q: torch.Tensor) -> torch.Tensor:
    """(rows, cols) codes in [0, 15] -> (rows, cols / 2) uint8, two codes a byte."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """(rows, cols / 2) uint8 -> (rows, cols) uint8 codes."""
    out = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.uint8, device=packed.device)
    out[:, 0::2] = packed & 0xF
    out[:, 1::2] = packed >> 4
    return out
