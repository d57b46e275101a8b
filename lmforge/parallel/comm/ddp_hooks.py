"""The DDP comm hook of the element-wise compressors (lmforge.parallel.comm.compressors), with
error feedback, and `register_compression`, which installs it (or PowerSGD) on a DDP model.

Per bucket, with W data-parallel ranks: y = grad / W + residual; the payload encodes y; the new
residual is y - decode(payload) (error feedback: what was not sent this step is sent later, so
the applied updates track the exact ones). Casts are all-reduced in their dtype; the rest are
all-gathered and every rank decodes and sums all payloads in rank order (gloo would wrap int8
sums around), so every replica gets the same bits.

Residuals are kept per parameter (by name), not per bucket: DDP re-lays out its buckets after the
first step, and a resumed run starts from the first layout again.

No `from __future__ import annotations` here: DDP checks the hook's annotations as objects.
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from lmforge.config.comm import CommConfig
from lmforge.parallel.comm.accounting import CommAccounting, allgather_bytes, allreduce_bytes
from lmforge.parallel.comm.compressors import Compressor, build_compressor


class CompressionHook:
    """State of `compressed_allreduce_hook`: the compressor, the group, the residuals by
    parameter name and the byte accounting. Stateful (`state_dict`) for checkpoints."""

    def __init__(self, compressor: Compressor, group: dist.ProcessGroup | None, names: dict[int, str],
                 error_feedback: bool = True) -> None:
        self.compressor = compressor
        self.group = group
        self.world = dist.get_world_size(group)
        self.names = names  # id(parameter) -> its name in the model
        self.error_feedback = error_feedback
        self.residuals: dict[str, torch.Tensor] = {}
        self.accounting = CommAccounting()

    def reduce(self, flat: torch.Tensor, names: list[str], numels: tuple[int, ...]) -> torch.Tensor:
        """The mean over ranks of `flat` (this rank's gradients of parameters `names`), compressed."""
        y = flat.float() / self.world
        if self.error_feedback:
            y = y + torch.cat([self.residuals[n].view(-1) if n in self.residuals else y.new_zeros(k)
                               for n, k in zip(names, numels)])
        payload, local = self.compressor.roundtrip(y, numels)
        if self.error_feedback:
            residual = y - local
            for name, piece in zip(names, residual.split(numels)):
                self.residuals[name] = piece
        wire = self.compressor.wire_bytes(numels)
        if self.compressor.summable:
            for t in payload:
                dist.all_reduce(t, group=self.group)
            out = self.compressor.decode(payload, numels)
            sent = allreduce_bytes(wire, self.world)
        else:
            gathered = []
            for t in payload:
                parts = [torch.empty_like(t) for _ in range(self.world)]
                dist.all_gather(parts, t.contiguous(), group=self.group)
                gathered.append(parts)
            out = torch.zeros_like(y)
            for r in range(self.world):  # rank order: the same sum on every rank
                out += self.compressor.decode([parts[r] for parts in gathered], numels)
            sent = allgather_bytes(wire, self.world)
        self.accounting.add_fp32_allreduce(sent, sum(numels), self.world)
        return out.to(flat.dtype)

    def metrics(self) -> dict[str, float]:
        return self.accounting.window()

    def state_dict(self) -> dict:
        return {"residuals": {k: v.detach().clone() for k, v in self.residuals.items()}, "world": self.world}

    def load_state_dict(self, state: dict) -> None:
        """Residuals are this rank's; saved by another number of ranks, every rank would get rank
        0's (the checkpoint's per-rank rule) and send it again: they start from zero instead."""
        same = state.get("world") == self.world
        self.residuals = {k: v.clone() for k, v in state["residuals"].items()} if same else {}


def compressed_allreduce_hook(state: CompressionHook, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: the bucket's gradients averaged over the ranks through `state.compressor`."""
    buffer = bucket.buffer()
    params = bucket.parameters()
    numels = tuple(p.numel() for p in params)
    if sum(numels) != buffer.numel():
        raise RuntimeError(f"DDP bucket of {buffer.numel()} values holds parameters of {sum(numels)}")
    buffer.copy_(state.reduce(buffer, [state.names[id(p)] for p in params], numels))
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(buffer)
    return fut


def parameter_names(module: nn.Module) -> dict[int, str]:
    """id(parameter) -> name, the key of per-parameter comm state (the model's own names)."""
    return {id(p): name for name, p in module.named_parameters()}


def register_compression(model: DDP, cfg: CommConfig, group: dist.ProcessGroup):  # -> CompressionHook | PowerSGDHook
    """Install `cfg.compression` on `model` (DDP, not "none"); return the hook's state (checkpoint
    it, read its `metrics()`)."""
    names = parameter_names(model.module)
    if cfg.compression == "powersgd":
        from lmforge.parallel.comm.powersgd import PowerSGDHook

        hook = PowerSGDHook(group, names, cfg.powersgd_rank, cfg.error_feedback, cfg.powersgd_start_step)
        model.register_comm_hook(hook, PowerSGDHook.hook)
        return hook
    state = CompressionHook(build_compressor(cfg), group, names, cfg.error_feedback)
    model.register_comm_hook(state, compressed_allreduce_hook)
    return state
