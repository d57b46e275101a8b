"""Perplexity on the held-out split, overall, on the trainer's validation sequences, and per domain.

The split is read as the trainer's validation loader reads it (data/loader.py, unshuffled): windows
of seq_len + 1 tokens at stride seq_len, window p of the stream is window p % n_windows, targets
the last seq_len tokens of each. Consecutive windows' targets are disjoint, so reading windows
0..n-1 scores every token of the split once (but the first and a tail shorter than a window).

- `validation`: the first train.eval_batches global batches (capped to what the split holds, as
  data/limits.py caps them for the trainer): the trainer's validation loss is the mean token loss
  over exactly these windows (every micro-batch has the same number of tokens, so its mean of
  micro-batch means is the token mean), and the perplexity is exp of it.
- overall and per domain: every window read (the whole split, or --max-batches global batches);
  a target token counts for the document it belongs to (val.idx.npy), hence for that document's
  domain (lmforge/eval/heldout.py). The split is in corpus order, so the first windows alone would
  cover only the first domains' documents: that is why the per-domain figures read further.

Evaluation runs in fp32 without autocast: for a run trained in bf16 the logged validation loss
differs from this by bf16 rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lmforge.data.limits import cap_eval_batches
from lmforge.eval.errors import EvalError
from lmforge.eval.heldout import HeldOut
from lmforge.eval.scoring import sequence_nll


@dataclass(frozen=True)
class Windows:
    """How the split is cut and batched: the run's train.seq_len, micro-batch (forward size),
    global batch and train.eval_batches; `max_batches` global batches at most (None: all)."""

    seq_len: int
    micro_batch: int
    global_batch: int
    eval_batches: int
    max_batches: int | None = None


def windows_to_read(held: HeldOut, w: Windows) -> int:
    """Windows of the split that an evaluation reads: all of them, or `max_batches` global batches;
    a split too short for one window is a data error."""
    n_windows = held.dataset.n_windows(w.seq_len)
    if n_windows < 1:
        raise EvalError(f"{held.data_dir}: the validation split has {held.dataset.n_tokens} tokens, too few for one "
                        f"window of train.seq_len + 1 = {w.seq_len + 1}")
    return n_windows if w.max_batches is None else min(n_windows, w.max_batches * w.global_batch)


def _figure(nll_sum: float, tokens: int) -> dict:
    loss = nll_sum / tokens if tokens else float("nan")
    return {"tokens": tokens, "loss": loss, "perplexity": math.exp(min(loss, 700.0)) if tokens else float("nan")}


def heldout_perplexity(model: nn.Module, held: HeldOut, w: Windows, device: torch.device,
                       eos_id: int | None, note: Callable[[str], None]) -> dict:
    """Perplexity figures of `model` on `held` (see the module docstring); `eos_id` for document
    masking when the model uses it. Deterministic: the same model and data give the same numbers."""
    ds, s = held.dataset, w.seq_len
    n_read, n_windows = windows_to_read(held, w), ds.n_windows(s)
    window_nll = np.zeros(n_read, dtype=np.float64)
    n_docs = len(held.starts) - 1
    doc_nll, doc_tokens = np.zeros(n_docs, dtype=np.float64), np.zeros(n_docs, dtype=np.int64)
    for first in range(0, n_read, w.micro_batch):
        idx = range(first, min(first + w.micro_batch, n_read))
        tokens = torch.from_numpy(np.stack([ds.window(i, s) for i in idx])).to(device)
        nll = sequence_nll(model, tokens[:, :-1], tokens[:, 1:], eos_id).double().cpu().numpy()
        window_nll[first:first + len(idx)] = nll.sum(axis=1)
        positions = np.asarray(idx, dtype=np.int64)[:, None] * s + 1 + np.arange(s)[None, :]
        doc_of_targets = held.document_of(positions.ravel())
        np.add.at(doc_nll, doc_of_targets, nll.ravel())
        np.add.at(doc_tokens, doc_of_targets, 1)
    out: dict = {"split": "val", "seq_len": s, "windows_in_split": n_windows, "windows": n_read,
                 **_figure(float(window_nll.sum()), n_read * s)}
    batches = cap_eval_batches(n_windows, w.global_batch, w.eval_batches, note)
    trainer = np.arange(batches * w.global_batch) % n_windows  # the unshuffled loader's windows
    if trainer.max() < n_read:
        out["validation"] = {"eval_batches": batches, "global_batch": w.global_batch, "windows": len(trainer),
                             **_figure(float(window_nll[trainer].sum()), len(trainer) * s)}
    else:
        note(f"note: no trainer-validation figure: --max-batches {w.max_batches} reads {n_read} windows, the "
             f"trainer's validation reads {batches} global batches of {w.global_batch}")
    out["domains"] = {}
    if held.labelled:
        names = sorted(set(held.domains))
        for name in names:
            sel = np.array([d == name for d in held.domains])
            docs = int(((doc_tokens > 0) & sel).sum())
            if docs:
                out["domains"][name] = {"documents": docs, **_figure(float(doc_nll[sel].sum()),
                                                                     int(doc_tokens[sel].sum()))}
    return out
