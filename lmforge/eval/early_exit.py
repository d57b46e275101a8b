"""Held-out perplexity under early exit (issue 17), for many thresholds from one forward pass.

Why one parallel forward is exact: the early-exit decoder (serve/early_exit.py) computes the
blocks a token skipped later, so every position's hidden states, at every exit, are the full
model's; a token's exit decision and its distribution depend only on those. The next-token
distribution at a position is therefore the first confident exit's, read from the exits' logits
of an ordinary forward (tests/unit/test_early_exit.py holds the decoder to that).

The windows are read as eval/perplexity.py reads them (the unshuffled validation loader's windows,
document masking when the model uses it), so threshold >= 1 gives that module's overall figure.
Per exit and position two numbers are kept (the confidence and the target's NLL), then every
threshold is a selection over them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lmforge.eval.errors import EvalError
from lmforge.eval.heldout import HeldOut
from lmforge.eval.perplexity import Windows, windows_to_read
from lmforge.eval.scoring import token_nll
from lmforge.models.common.sparse_attention import document_starts
from lmforge.serve.early_exit import MEASURES, confidence, exit_index
from lmforge.serve.exit_gate import ExitGates


@dataclass
class ExitScores:
    """Per scored position (flattened over windows): each exit's confidence and the target's NLL
    (index len(layers): the final layer), so any threshold can be applied afterwards."""

    layers: tuple[int, ...]
    n_layers: int
    measure: str
    confidence: np.ndarray  # (exits, positions)
    nll: np.ndarray  # (exits + 1, positions)

    def at(self, threshold: float) -> dict:
        """Perplexity, mean blocks run and the share of tokens leaving at each exit (by its layer)."""
        idx = exit_index([torch.from_numpy(c) for c in self.confidence], threshold).numpy()
        nll = np.take_along_axis(self.nll, idx[None], axis=0)[0]
        depths = np.array([*self.layers, self.n_layers])[idx]
        loss = float(nll.mean())
        shares = {str(k): float((idx == i).mean()) for i, k in enumerate([*self.layers, self.n_layers])}
        return {"threshold": threshold, "measure": self.measure, "tokens": int(nll.size), "loss": loss,
                "perplexity": math.exp(min(loss, 700.0)), "mean_depth": float(depths.mean()), "exit_share": shares}


@torch.inference_mode()
def exit_scores(model: nn.Module, held: HeldOut, w: Windows, device: torch.device, eos_id: int | None,
                measure: str = "max_prob", gates: ExitGates | None = None) -> ExitScores:
    """Confidences and NLLs of every exit over the held-out windows (up to w.max_batches global
    batches). Measure "learned" reads `gates` on each exit's final-normed state."""
    if measure not in MEASURES:
        raise EvalError(f"early-exit measure {measure!r}: must be one of {', '.join(MEASURES)}")
    cfg = model.cfg
    layers = tuple(cfg.early_exit.layers)
    if not layers:
        raise EvalError("the model has no early exits (model.early_exit.layers is empty)")
    if measure == "learned":
        if gates is None:
            raise EvalError("early-exit measure 'learned' needs exit gates (--exit-gates FILE; lmforge exit-gates fit)")
        gates.check(cfg.dim, layers, "--exit-gates")
    ds, s = held.dataset, w.seq_len
    n_read = windows_to_read(held, w)
    conf: list[list[np.ndarray]] = [[] for _ in layers]
    nll: list[list[np.ndarray]] = [[] for _ in range(len(layers) + 1)]
    learned = gates if measure == "learned" else None
    states: dict[int, torch.Tensor] = {}  # "learned": each exit's hidden state, from a forward hook
    hooks = [model.layers[str(k - 1)].register_forward_hook(lambda _m, _a, out, k=k: states.__setitem__(k, out))
             for k in layers] if learned is not None else []
    try:
        for first in range(0, n_read, w.micro_batch):
            idx = range(first, min(first + w.micro_batch, n_read))
            tokens = torch.from_numpy(np.stack([ds.window(i, s) for i in idx])).to(device)
            x, y = tokens[:, :-1], tokens[:, 1:]
            doc_start = document_starts(x, eos_id) if eos_id is not None else None
            final, exits = model(x, doc_start=doc_start, exits=True)
            for i, (k, z) in enumerate(zip(layers, exits, strict=True)):
                c = learned.confidence(k, model.norm(states[k])) if learned is not None else confidence(z, measure)
                conf[i].append(c.reshape(-1).cpu().numpy())
            for i, z in enumerate([*exits, final]):
                nll[i].append(token_nll(z, y).reshape(-1).double().cpu().numpy())
    finally:
        for h in hooks:
            h.remove()
    return ExitScores(layers, cfg.n_layers, measure, np.stack([np.concatenate(c) for c in conf]),
                      np.stack([np.concatenate(n) for n in nll]))
