"""The optional recovery fine-tune after pruning: a few AdamW steps on the training data with the
sparsity masks held, so pruned weights stay exactly zero.

How the masks are held: after backward each masked gradient is multiplied by its mask (so the
masked entries add nothing to the gradient norm that clipping sees, and AdamW's moments stay zero
there), and after each optimizer step the weight is multiplied by its mask again (so nothing, not
even a rounding or a later change of optimizer, can revive a pruned weight). Every other parameter
(embeddings, norms, the head, the kept weights) trains. The loss before and after is the
trainer's validation loss (the first `eval_batches` global batches of the in-order val split), so
the two figures are comparable with the run's own log and with `lmforge eval`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.compress.errors import CompressError
from lmforge.compress.train_data import TrainData
from lmforge.data.loader import DistributedTokenLoader, TokenDataset
from lmforge.models.common.sparse_attention import document_starts

CLIP = 1.0  # global gradient-norm clip, as the trainer's default max_grad_norm
BETAS = (0.9, 0.95)


@dataclass(frozen=True)
class RecoverySetup:
    """Batch shape and evaluation size (the run's train section; an HF source: the trainer's defaults)."""

    steps: int
    lr: float
    seq_len: int
    micro_batch_size: int
    eval_micro_batches: int
    seed: int = 0


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    doc = document_starts(x, eos_id) if eos_id is not None else None
    logits = model(x) if doc is None else model(x, doc_start=doc)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def validation_loss(model: nn.Module, data: TrainData, setup: RecoverySetup, eos_id: int | None) -> float:
    """Mean loss over the first `eval_micro_batches` micro-batches of the in-order val split."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    val = DistributedTokenLoader(TokenDataset(data.data_dir, "val"), setup.seq_len, setup.micro_batch_size,
                                 shuffle=False, prefetch=False)
    n = min(setup.eval_micro_batches, max(1, val.n_windows // setup.micro_batch_size))
    total = 0.0
    for _ in range(n):
        x, y = val.next_batch()
        total += float(_loss(model, x.to(device), y.to(device), eos_id))
    model.train(was_training)
    return total / n


def recover(model: nn.Module, masks: dict[str, torch.Tensor], data: TrainData, setup: RecoverySetup,
            eos_id: int | None, say: Callable[[str], None] = lambda _: None) -> dict:
    """Fine-tune `model` in place for `setup.steps` steps with `masks` held; the figures for the report."""
    params = dict(model.named_parameters())
    missing = [k for k in masks if k not in params]
    if missing:
        raise CompressError(f"recovery: masks name weights the model does not have: {', '.join(missing[:3])}")
    device = next(model.parameters()).device
    held = [(params[k], m.to(device=device, dtype=params[k].dtype)) for k, m in masks.items()]
    loader, how = data.loader(setup.seq_len, setup.micro_batch_size, setup.seed)
    before = validation_loss(model, data, setup, eos_id)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=setup.lr, betas=BETAS,
                            weight_decay=0.0)
    losses: list[float] = []
    t0 = time.perf_counter()
    model.train()
    for step in range(setup.steps):
        x, y = loader.next_batch()
        loss = _loss(model, x.to(device), y.to(device), eos_id)
        if not math.isfinite(loss_value := float(loss.detach())):
            raise CompressError(f"recovery fine-tune: loss is {loss_value} at step {step}; lower --recover-lr "
                                f"(now {setup.lr:g})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            for p, m in held:
                if p.grad is not None:
                    p.grad.mul_(m)
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        with torch.no_grad():
            for p, m in held:
                p.mul_(m)
        losses.append(loss_value)
        if (step + 1) % max(1, setup.steps // 5) == 0 or step + 1 == setup.steps:
            say(f"recovery step {step + 1}/{setup.steps}: loss {losses[-1]:.4f}")
    model.eval()
    after = validation_loss(model, data, setup, eos_id)
    k = max(1, setup.steps // 10)
    return {"steps": setup.steps, "lr": setup.lr, "optimizer": f"AdamW betas {BETAS}, no weight decay, constant lr",
            "grad_clip": CLIP, "seq_len": setup.seq_len, "micro_batch_size": setup.micro_batch_size,
            "sampling": how, "seed": setup.seed,
            "val_loss_before": before, "val_loss_after": after,
            "val_perplexity_before": math.exp(before), "val_perplexity_after": math.exp(after),
            "val_micro_batches": setup.eval_micro_batches,
            "train_loss_first": sum(losses[:k]) / k, "train_loss_last": sum(losses[-k:]) / k,
            "seconds": time.perf_counter() - t0}
