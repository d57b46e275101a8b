"""Pruning a Transformer's block linears in place, block by block.

Wanda is sequential, as in the paper's code (`prune_wanda`): the calibration windows are embedded
once; then for each block in turn, forward hooks on its target linears sum the squares of their
input features while the block runs on the current inputs, every target linear of the block is
pruned from those statistics, and the *pruned* block is run again to give the next block its
inputs. So each block is calibrated on what the already-pruned blocks below it actually produce,
not on the dense model's activations. (Inside one block the linears are scored on the block's
dense activations, as in the paper.) Magnitude pruning needs no data: each layer's mask comes
from its weights alone.

Only plain (out, in) linear weights are pruned; MoE experts (3-D weights) are refused.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lmforge.compress.errors import CompressError
from lmforge.compress.prune_masks import feature_outlier_ratio, keep_mask, magnitude_scores, wanda_scores
from lmforge.compress.prune_options import TARGETS, PruneOptions
from lmforge.config import ModelConfig
from lmforge.models.common.rope import dynamic_rope_length, rope_tables
from lmforge.models.common.sparse_attention import document_starts

CHUNK = 8  # calibration windows per block forward (bounds the attention's temporaries)


def target_linears(model: nn.Module, targets: tuple[str, ...]) -> dict[str, nn.Linear]:
    """{fully qualified module name: module} of the target linears, block by block."""
    out: dict[str, nn.Linear] = {}
    for key, block in model.layers.items():
        for t in targets:
            out[f"layers.{key}.{TARGETS[t]}"] = block.get_submodule(TARGETS[t])
    return out


def check_prunable(model: nn.Module, cfg: ModelConfig, opts: PruneOptions) -> None:
    """Refuse, in one line, a model these methods cannot prune as asked."""
    moe = [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]
    if moe:
        raise CompressError(f"model has MoE layers ({cfg.moe.n_experts} experts in layers "
                            f"{', '.join(map(str, moe[:8]))}{'...' if len(moe) > 8 else ''}): their expert weights "
                            "are 3-D tensors that magnitude and Wanda pruning here do not handle; prune a dense model")
    if not hasattr(model, "layers") or not len(model.layers):
        raise CompressError("model has no transformer blocks to prune (a pipeline stage without layers?)")
    if opts.pattern is not None:
        n, m = opts.pattern
        for name, lin in target_linears(model, opts.targets).items():
            if lin.in_features % m:
                raise CompressError(f"{name}: {lin.in_features} input features are not a multiple of {m}, so {n}:{m} "
                                    f"groups do not tile its rows; choose a pattern whose M divides it, or leave "
                                    f"{name.rsplit('.', 1)[-1]} out of --targets")


def _mask_of(lin: nn.Linear, name: str, opts: PruneOptions, sq_sum: torch.Tensor | None) -> torch.Tensor:
    scores = wanda_scores(lin.weight, sq_sum) if sq_sum is not None else magnitude_scores(lin.weight)
    return keep_mask(scores, opts.sparsity, opts.pattern, per_row=opts.method == "wanda", name=name)


def _apply(lin: nn.Linear, mask: torch.Tensor) -> None:
    lin.weight.mul_(mask.to(lin.weight.dtype))


@torch.no_grad()
def prune_magnitude(model: nn.Module, opts: PruneOptions) -> dict[str, torch.Tensor]:
    """Magnitude pruning of every target linear; {weight name: keep-mask}."""
    masks = {}
    for name, lin in target_linears(model, opts.targets).items():
        masks[f"{name}.weight"] = mask = _mask_of(lin, name, opts, None)
        _apply(lin, mask)
    return masks


def _rope(model: nn.Module, cfg: ModelConfig, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The RoPE tables a whole-model forward would hand its blocks for `seq` tokens from position 0."""
    if (length := dynamic_rope_length(cfg, seq)) is not None:
        return rope_tables(cfg, model.rope_cos.device, length)
    return model.rope_cos, model.rope_sin


def _sum_squares_into(total: torch.Tensor) -> Callable[[nn.Module, tuple], None]:
    """A forward pre-hook adding each input feature's sum of squares over all tokens to `total`."""
    def hook(_module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        total.add_(x.reshape(-1, x.shape[-1]).double().pow(2).sum(0))
    return hook


@torch.no_grad()
def prune_wanda(model: nn.Module, cfg: ModelConfig, opts: PruneOptions, tokens: torch.Tensor, eos_id: int | None,
                say: Callable[[str], None] = lambda _: None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Sequential Wanda (module docstring) on calibration `tokens` (samples, seq); `eos_id`: the
    document masking of training (None: off). Returns ({weight name: keep-mask}, {module name: input
    feature outlier ratio max/median of ||X_j||})."""
    was_training = model.training
    model.eval()
    device = model.rope_cos.device
    tokens = tokens.to(device)
    cos, sin = _rope(model, cfg, tokens.shape[1])
    chunks = list(tokens.split(CHUNK))
    docs = [document_starts(c, eos_id) if eos_id is not None else None for c in chunks]
    hidden = [model.tok_embeddings(c) for c in chunks]
    masks: dict[str, torch.Tensor] = {}
    outliers: dict[str, float] = {}
    try:
        for key, block in model.layers.items():
            lins = {f"layers.{key}.{TARGETS[t]}": block.get_submodule(TARGETS[t]) for t in opts.targets}
            sq = {name: torch.zeros(lin.in_features, dtype=torch.float64, device=device) for name, lin in lins.items()}
            # Hooks also take each linear off the fused q/k/v and gate/up path (linear.py), so each sees its input.
            handles = [lin.register_forward_pre_hook(_sum_squares_into(sq[name])) for name, lin in lins.items()]
            try:
                for h, d in zip(hidden, docs):
                    block(h, cos, sin, None, d)
            finally:
                for handle in handles:
                    handle.remove()
            for name, lin in lins.items():
                masks[f"{name}.weight"] = mask = _mask_of(lin, name, opts, sq[name])
                _apply(lin, mask)
                outliers[name] = feature_outlier_ratio(sq[name])
            hidden = [block(h, cos, sin, None, d) for h, d in zip(hidden, docs)]  # the pruned block's outputs
            say(f"pruned block {key} ({len(lins)} linears, {tokens.numel():,} calibration tokens)")
    finally:
        model.train(was_training)
    return masks, outliers
