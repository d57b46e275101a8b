"""A learned early-exit confidence (CALM's early-exit classifier, Schuster et al., 2022): per exit,
a linear map of the exit's hidden state (after the shared final norm, what the LM head reads) that
predicts log KL(full model || exit) of that token's next-token distribution.

Why: the softmax measures ("max_prob", "margin") need the LM head at every exit a token passes,
and on a small model few tokens are confident at an exit although the exit agrees with the full
model on many more (docs/benchmarks.md: on the main job's model, max_prob lets 16% of the tokens
leave at exit 1 within +2% perplexity, a KL oracle 63%). The gate reads the state the exit
already has, costs one dot product, and calls the head only for a token that leaves.

Confidence = exp(-predicted KL), in (0, 1]: a threshold means the same as for the softmax
measures ("leave when confidence >= threshold"; >= 1 never leaves). The gate is fitted after
training on the model's own train windows, by ridge regression (closed form), and stored beside
the model as safetensors (`lmforge exit-gates fit`); it does not change the model's weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmforge.models.llama.model import Transformer

GATES_FILE = "exit_gates.safetensors"
KL_FLOOR = 1e-4  # log KL is regressed; an exit equal to the full model would be log 0


class ExitGateError(ValueError):
    """Gates that cannot be fitted, read or used with this model (one line)."""


@dataclass(frozen=True)
class ExitGates:
    """weight (exits, dim) and bias (exits,) per exit in `layers`, on the final-normed exit state."""

    layers: tuple[int, ...]
    weight: torch.Tensor
    bias: torch.Tensor
    windows: int = 0

    def confidence(self, layer: int, normed: torch.Tensor) -> torch.Tensor:
        """(..., dim) final-normed states at exit `layer` -> (...) confidence exp(-predicted KL)."""
        i = self.layers.index(layer)
        log_kl = normed.float() @ self.weight[i].to(normed.device) + self.bias[i].to(normed.device)
        return torch.exp(-torch.exp(log_kl.clamp(max=30.0)))

    def decision(self, norm_weight: torch.Tensor, eps: float, threshold: float) -> GateDecision:
        """The per-step test `confidence(norm(h)) >= threshold` on the raw exit state h, with the
        RMSNorm folded in and everything that does not depend on h computed once (what the decoder
        runs between blocks)."""
        return GateDecision(self, norm_weight, eps, threshold)

    def check(self, dim: int, layers: tuple[int, ...], where: str) -> None:
        """The gates were fitted for a model of width `dim` and cover every exit in `layers`."""
        if self.weight.shape[1] != dim:
            raise ExitGateError(f"{where}: gates for dim {self.weight.shape[1]}, the model has dim {dim}")
        missing = [k for k in layers if k not in self.layers]
        if missing:
            raise ExitGateError(f"{where}: no gate for exits {missing} (gates for {list(self.layers)}); refit with "
                                "lmforge exit-gates fit")

    def save(self, path: Path) -> None:
        """Write atomically (temp file, fsync, rename): a crash never leaves a half-written file."""
        from safetensors.torch import save

        from lmforge.storage.atomic import atomic_open

        meta = {"layers": json.dumps(list(self.layers)), "windows": str(self.windows),
                "target": "log KL(full || exit) from the final-normed exit state"}
        blob = save({"weight": self.weight.contiguous(), "bias": self.bias.contiguous()}, metadata=meta)
        with atomic_open(Path(path), "wb") as f:
            f.write(blob)

    @classmethod
    def load(cls, path: Path) -> ExitGates:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
            layers = tuple(int(k) for k in json.loads(meta["layers"]))
        except FileNotFoundError:
            raise ExitGateError(f"{path}: no such exit-gates file (make one: lmforge exit-gates fit SOURCE)") from None
        except (SafetensorError, OSError, KeyError, ValueError, TypeError) as e:
            raise ExitGateError(f"{path}: not an exit-gates file ({e.__class__.__name__}: {e})") from None
        if weight.ndim != 2 or bias.shape != (weight.shape[0],) or len(layers) != weight.shape[0]:
            raise ExitGateError(f"{path}: weight {tuple(weight.shape)} and bias {tuple(bias.shape)} do not match "
                                f"exits {list(layers)}")
        return cls(layers, weight.float(), bias.float(), int(meta.get("windows", 0)))


@torch.inference_mode()
def exit_features(model: Transformer, tokens: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """For (batch, seq+1) windows: per exit, the final-normed states (positions, dim) and the
    log KL(full || exit) targets (positions,), from one forward with the exits' hidden states."""
    layers = list(model.cfg.early_exit.layers)
    states: dict[int, torch.Tensor] = {}
    hooks = [model.layers[str(k - 1)].register_forward_hook(
        lambda _m, _a, out, k=k: states.__setitem__(k, out)) for k in layers]
    try:
        final, exits = model(tokens[:, :-1], exits=True)
    finally:
        for h in hooks:
            h.remove()
    full = final.float().log_softmax(-1)
    feats, targets = [], []
    for k, z in zip(layers, exits, strict=True):
        kl = (full.exp() * (full - z.float().log_softmax(-1))).sum(-1).clamp(min=0)
        feats.append(model.norm(states[k]).reshape(-1, model.cfg.dim).float())
        targets.append(torch.log(kl + KL_FLOOR).reshape(-1))
    return feats, targets


def fit_exit_gates(model: Transformer, windows: list[np.ndarray], alpha: float = 1.0) -> ExitGates:
    """Ridge regression per exit of log KL on the final-normed exit state, over `windows` (each
    seq+1 tokens of the model's train data); the intercept is not penalised."""
    layers = tuple(model.cfg.early_exit.layers)
    if not layers:
        raise ExitGateError("the model has no early exits (model.early_exit.layers is empty): nothing to gate")
    if not windows:
        raise ExitGateError("no windows to fit the gates on")
    dim = model.cfg.dim
    xtx = torch.zeros(len(layers), dim + 1, dim + 1, dtype=torch.float64)
    xty = torch.zeros(len(layers), dim + 1, dtype=torch.float64)
    for first in range(0, len(windows), 8):
        batch = torch.from_numpy(np.stack(windows[first:first + 8])).long()
        feats, targets = exit_features(model, batch.to(next(model.parameters()).device))
        for i, (x, y) in enumerate(zip(feats, targets, strict=True)):
            x1 = torch.cat([x.double().cpu(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
            xtx[i] += x1.T @ x1
            xty[i] += x1.T @ y.double().cpu()
    penalty = np.eye(dim + 1) * alpha
    penalty[dim, dim] = 0
    # numpy's solver: torch's batched float64 solve failed inside MKL (DLASWP) with 2 threads set
    solved = torch.from_numpy(np.stack([np.linalg.solve(a.numpy() + penalty, b.numpy())
                                        for a, b in zip(xtx, xty, strict=True)]))
    return ExitGates(layers, solved[:, :dim].float(), solved[:, dim].float(), len(windows))


class GateDecision:
    """exp(-exp(L)) >= t  <=>  L <= ln(-ln t), with L = (w * g) . h / rms(h) + b: per exit the
    folded weight and the cut on the raw dot product, so a step pays a dot product, a mean of
    squares and one comparison (threshold 0: always leave; >= 1: never)."""

    def __init__(self, gates: ExitGates, norm_weight: torch.Tensor, eps: float, threshold: float):
        g = norm_weight.detach().float()
        cut = math.inf if threshold <= 0 else -math.inf if threshold >= 1 else math.log(-math.log(threshold))
        self.eps = eps
        self.weight = {k: (gates.weight[i].to(g.device) * g) for i, k in enumerate(gates.layers)}
        self.cut = {k: cut - float(gates.bias[i]) for i, k in enumerate(gates.layers)}

    def leaves(self, layer: int, h: torch.Tensor) -> bool:
        """Whether every row of h (rows, dim) leaves at exit `layer`."""
        x = h.float()
        return bool(((x @ self.weight[layer]) * torch.rsqrt(x.pow(2).mean(-1) + self.eps) <= self.cut[layer]).all())
