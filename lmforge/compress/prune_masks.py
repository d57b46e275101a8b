"""Which weights of one linear layer to keep: scores and masks, pure tensor functions.

Scores (Wanda paper, Sun et al. 2023, eq. 1): magnitude |W_ij|; Wanda |W_ij| * ||X_j||_2, where
||X_j||_2 is the l2 norm of input feature j over all calibration tokens. A few input features of
LLMs carry activations 10-100x larger than the rest; a small weight reading one of them matters more
than a large weight reading a quiet one, which |W| alone cannot see.

Comparison groups (which scores compete for the kept slots), as in the paper's code:
- unstructured magnitude: the whole layer (the classical baseline);
- unstructured Wanda: each output row (the paper's per-output comparison, which it found better
  for LLMs than per layer);
- N:M (both methods): each group of M consecutive input weights of a row keeps its N best.

Every mask keeps exactly the stated count in its group; ties are broken by position (a stable
sort), so the same weights and activations always give the same mask.
"""

from __future__ import annotations

import torch

from lmforge.compress.errors import CompressError


def wanda_scores(weight: torch.Tensor, feature_sq_sum: torch.Tensor) -> torch.Tensor:
    """|W| * ||X_j||_2 (out, in) from the per-input-feature sum of squares over calibration tokens."""
    if feature_sq_sum.shape != (weight.shape[1],):
        raise ValueError(f"activation statistics of shape {tuple(feature_sq_sum.shape)} for a weight "
                         f"{tuple(weight.shape)}: need ({weight.shape[1]},)")
    return weight.detach().abs().double() * feature_sq_sum.double().sqrt()[None, :]


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().double()


def _drop_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool keep-mask of the last dim: False at the k lowest scores of each row (stable on ties)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        order = torch.argsort(scores, dim=-1, stable=True)
        keep.scatter_(-1, order[..., :k], False)
    return keep


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Keep-mask with floor(n * sparsity) weights dropped per output row (`per_row`) or over the
    whole layer (n: the group's size)."""
    if per_row:
        return _drop_lowest(scores, int(scores.shape[1] * sparsity))
    flat = scores.reshape(1, -1)
    return _drop_lowest(flat, int(flat.shape[1] * sparsity)).reshape(scores.shape)


def n_m_mask(scores: torch.Tensor, n: int, m: int, name: str = "weight") -> torch.Tensor:
    """Keep-mask with the n best of every m consecutive input weights of each row."""
    out_f, in_f = scores.shape
    if in_f % m:
        raise CompressError(f"{name}: {in_f} input features are not a multiple of {m}, so {n}:{m} groups do not "
                            f"tile its rows; choose a pattern whose M divides {in_f}, or leave it out of --targets")
    return _drop_lowest(scores.reshape(out_f, in_f // m, m), m - n).reshape(out_f, in_f)


def keep_mask(scores: torch.Tensor, sparsity: float | None, pattern: tuple[int, int] | None, per_row: bool,
              name: str = "weight") -> torch.Tensor:
    """The mask of one layer for either scheme (exactly one of `sparsity`, `pattern` set)."""
    if pattern is not None:
        return n_m_mask(scores, pattern[0], pattern[1], name)
    assert sparsity is not None
    return unstructured_mask(scores, sparsity, per_row)


def feature_outlier_ratio(feature_sq_sum: torch.Tensor) -> float:
    """max_j ||X_j|| / median_j ||X_j||: how far the loudest input feature stands out (the
    property Wanda's advantage over magnitude rests on; ~1-3 means no outlier features)."""
    norms = feature_sq_sum.double().sqrt()
    median = float(norms.median())
    return float(norms.max()) / median if median > 0 else float("inf")
