"""GPTQ over a whole model, block by block (as the GPTQ paper does): the calibration windows run
through the model with hooks that accumulate each linear layer's input Hessian; the block's layers
are quantized and their weights replaced by the dequantized values, so the next block is calibrated
on the inputs the quantized model really produces. The output head comes last, on the final norm's
outputs of the fully quantized stack."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lmforge.compress.gptq import GPTQResult, HessianAccumulator, gptq_quantize
from lmforge.compress.train_data import CalibrationSet
from lmforge.models.common.sparse_attention import document_starts


class _Stop(Exception):
    """Raised by a hook after the block being calibrated: the rest of the forward is not needed."""


def _linears(module: nn.Module, prefix: str) -> dict[str, nn.Linear]:
    if isinstance(module, nn.Linear):
        return {prefix: module}
    return {f"{prefix}.{n}": m for n, m in module.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def _hessians(model: nn.Module, targets: dict[str, nn.Linear], stop_after: nn.Module | None,
              calib: CalibrationSet, doc_mask: bool, batch: int) -> dict[str, HessianAccumulator]:
    acc = {name: HessianAccumulator(lin.in_features) for name, lin in targets.items()}
    handles = [lin.register_forward_pre_hook(lambda _m, args, a=acc[name]: a.add(args[0]))
               for name, lin in targets.items()]
    if stop_after is not None:
        def stop(*_):
            raise _Stop
        handles.append(stop_after.register_forward_hook(stop))
    device = next(model.parameters()).device
    try:
        for i in range(0, calib.tokens.shape[0], batch):
            tokens = calib.tokens[i:i + batch].to(device)
            doc_start = document_starts(tokens, calib.eos_id) if doc_mask else None
            try:
                model(tokens, doc_start=doc_start)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return acc


def gptq_model(model: nn.Module, calib: CalibrationSet, group_size: int, doc_mask: bool,
               skip: set[str], say: Callable[[str], None], batch: int = 8) -> dict[str, GPTQResult]:
    """GPTQ results for every linear weight of `model.layers` and `model.output` (names as in the
    state dict, without ".weight"), except `skip`; `model`'s weights are left dequantized."""
    was_training = model.training
    model.eval()
    results: dict[str, GPTQResult] = {}
    stages: list[tuple[str, nn.Module, nn.Module | None]] = [
        (f"layers.{i}", block, block) for i, block in model.layers.items()]
    stages.append(("output", model.output, None))
    try:
        for prefix, module, stop in stages:
            targets = {n: lin for n, lin in _linears(module, prefix).items() if n not in skip}
            if not targets:
                continue
            hessians = _hessians(model, targets, stop, calib, doc_mask, batch)
            for name, lin in targets.items():
                res = gptq_quantize(lin.weight, hessians[name].h, group_size)
                lin.weight.data.copy_(res.dequantized.to(lin.weight.dtype))
                results[name] = res
            say(f"gptq: {prefix}: {len(targets)} linear layer(s) quantized")
    finally:
        model.train(was_training)
    return results
