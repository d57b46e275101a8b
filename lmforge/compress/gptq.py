"""GPTQ (Frantar et al., 2023): 4-bit group-wise quantization of one linear weight that corrects each
column's rounding error on the columns not yet quantized, weighted by the inverse Hessian of the
layer's reconstruction loss ||W X - Q X||^2, H = 2 X X^T over calibration inputs.

As the reference implementation (IST-DASLab/gptq): dead inputs (H_ii = 0) are zeroed, H is damped
by `damp` x mean(diag H) (more if Cholesky still fails), the upper Cholesky factor of H^-1 drives
the updates, columns are processed in blocks whose errors are applied to the rest lazily (one
matmul per block), and each group's grid (scale, zero) is fixed when its first column is reached,
from the group's weights as updated so far. No activation reordering: groups stay contiguous, so
the stored format is the plain group-wise one the runtimes read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.compress.int4 import GroupGrid, dequantize_codes, grid_for, quantize_column

DAMP = 0.01
BLOCK = 128


class HessianAccumulator:
    """H = 2/n sum x x^T over the rows of every input seen (running mean, fp32)."""

    def __init__(self, in_features: int):
        self.h = torch.zeros(in_features, in_features, dtype=torch.float32)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float().cpu()
        m = x.shape[0]
        self.h *= self.n / (self.n + m)
        self.n += m
        x = x * (2 / self.n) ** 0.5
        self.h += x.t() @ x


@dataclass(frozen=True)
class GPTQResult:
    codes: torch.Tensor  # (rows, cols) uint8 in [0, 15]
    grid: GroupGrid
    dequantized: torch.Tensor  # (rows, cols) fp32: what the codes stand for
    loss: float  # sum of (w - q)^2 / (2 Hinv_ii^2): the reference implementation's per-layer error


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damping)^-1, damping raised x10 until H is positive definite."""
    mean_diag = torch.mean(torch.diag(h)).item() or 1.0
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for attempt in range(6):
        hd = h + eye * (damp * 10 ** attempt) * mean_diag
        lower, info = torch.linalg.cholesky_ex(hd)
        if info.item() == 0:
            inv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if info.item() == 0:
                return upper
    raise ValueError("GPTQ: the calibration Hessian is not positive definite even with damping 1e4 x the default")


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, group_size: int, damp: float = DAMP) -> GPTQResult:
    """Quantize `weight` (rows, cols) to 4-bit codes with one grid per `group_size` columns."""
    w = weight.detach().float().cpu().clone()
    rows, cols = w.shape
    h = hessian.clone().float()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    hinv = _inverse_cholesky(h, damp)
    codes = torch.zeros(rows, cols, dtype=torch.float32)
    groups = cols // group_size
    scales = torch.zeros(rows, groups)
    zeros = torch.zeros(rows, groups)
    block = max(group_size, BLOCK // group_size * group_size)  # a group never straddles two blocks
    loss = torch.zeros(rows)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:
                scale, zero = grid_for(w1[:, i:i + group_size])
                scales[:, col // group_size], zeros[:, col // group_size] = scale, zero
            scale, zero = scales[:, col // group_size], zeros[:, col // group_size]
            q = quantize_column(w1[:, i], scale, zero)
            codes[:, col] = q
            deq = (q - zero) * scale
            d = hinv1[i, i]
            e = (w1[:, i] - deq) / d
            loss += (w1[:, i] - deq) ** 2 / d ** 2 / 2
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    grid = GroupGrid(scales, zeros)
    return GPTQResult(codes.to(torch.uint8), grid, dequantize_codes(codes, scales, zeros, group_size),
                      float(loss.sum().item()))
