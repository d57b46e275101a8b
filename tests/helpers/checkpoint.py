"""A small trained model for checkpoint tests (debug size, a few AdamW steps with a scheduler) and
the exact comparison of two AdamW optimizers' state."""

from __future__ import annotations

from dataclasses import replace

import torch

from lmforge.models.llama.model import build_model
from lmforge.models.llama.sizes import SIZES

CFG = replace(SIZES["debug"], max_seq_len=32)


def trained(seed: int = 0, steps: int = 2) -> tuple[torch.nn.Module, torch.optim.Optimizer,
                                                    torch.optim.lr_scheduler.LRScheduler]:
    model = build_model(CFG, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        tokens = torch.randint(0, CFG.vocab_size, (2, 16), generator=g)
        loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model, opt, sched


def assert_same_optimizer(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys() and len(sa["state"]) > 0
    for i in sa["state"]:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(sa["state"][i][name], sb["state"][i][name]), (i, name)
