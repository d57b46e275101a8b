"""How tensors are stored in a checkpoint: flat DCP keys, lossy optimizer moments, tensor digests.

Flat keys: the manager hands DCP one flat dict whose keys are what DCP itself would make of the
nested state (`flatten_state_dict`: "model.<fqn>", "optim.state.<fqn>.exp_avg", ...), so old and
new checkpoints have the same key layout and a weights-only load still works. Working on the flat
dict is what lets the manager store a key in another form (below) or not at all (incremental).

Lossy optimizer moments (`optimizer_states`): AdamW's exp_avg / exp_avg_sq are half to two thirds
of a training checkpoint and tolerate rounding; weights are always stored exactly. A moment `k`
is stored as `k::bf16` (bf16, round to nearest), or as `k::int8` + `k::absmax` (int8 with one fp32
scale per block of `block` values along the last dim). For int8, exp_avg is rounded to nearest
(error <= scale/2) and exp_avg_sq is stored as sqrt(v) rounded *up*: the restored second moment
is never smaller than the saved one, so no Adam update m/(sqrt(v)+eps) can grow from the
rounding (a small v rounded to 0 would otherwise blow up the next step).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from lmforge.tensors.dtensor import local_shard

__all__ = ["BF16", "INT8", "SCALE", "decode_moment", "encode_moments", "is_moment", "quantize_int8",
           "dequantize_int8", "stored_names", "tensor_digest"]

BF16, INT8, SCALE = "::bf16", "::int8", "::absmax"
_MOMENTS = ("exp_avg", "exp_avg_sq")


def is_moment(key: str) -> bool:
    """An optimizer moment in the flat layout: optim.state.<fqn>.exp_avg(_sq)."""
    return key.startswith("optim.state.") and key.rsplit(".", 1)[-1] in _MOMENTS


def _blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    last = x.shape[-1]
    nb = -(-last // block)
    rows = x.reshape(-1, last)
    if nb * block != last:
        rows = torch.nn.functional.pad(rows, (0, nb * block - last))
    return rows.view(rows.shape[0], nb, block), nb


def quantize_int8(x: torch.Tensor, block: int, round_up: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 tensor shaped like x, fp32 scales shaped (*x.shape[:-1], ceil(last/block))).
    Per block: scale = absmax/127, q = round(x/scale) (ceil when round_up: decoded >= x)."""
    xb, nb = _blocks(x.float(), block)
    scale = xb.abs().amax(dim=-1, keepdim=True) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = xb / scale
    q = (torch.ceil(y) if round_up else torch.round(y)).clamp_(-127, 127).to(torch.int8)
    q = q.view(q.shape[0], -1)[:, : x.shape[-1]].reshape(x.shape)
    return q.contiguous(), scale.view(*x.shape[:-1], nb).contiguous()


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    qb, nb = _blocks(q.float(), block)
    out = (qb * scale.reshape(-1, nb, 1)).view(qb.shape[0], -1)[:, : q.shape[-1]]
    return out.reshape(q.shape)


def _int8_ok(t: torch.Tensor) -> bool:
    """int8 blocks run along the last dim, computed on this rank's data: plain tensors, or DTensors
    whose last dim is not sharded (else blocks would straddle ranks; those are stored as bf16)."""
    if t.dim() == 0:
        return False
    if isinstance(t, DTensor):
        return all(not (p.is_shard() and p.dim in (t.dim() - 1, -1)) for p in t.placements)
    return True


def _like(ref: torch.Tensor, local: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """`local` as a DTensor laid out like `ref` (same mesh/placements) with global `shape`."""
    if not isinstance(ref, DTensor):
        return local
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.fromlocal_shard(local, ref.device_mesh, ref.placements, run_check=False, shape=torch.Size(shape),
                              stride=stride)


def encode_moments(flat: Mapping[str, Any], mode: str, block: int) -> dict[str, Any]:
    """The flat dict with optimizer moments in the stored form of `mode` ("fp32" returns it as is)."""
    if mode == "fp32":
        return dict(flat)
    out: dict[str, Any] = {}
    for k, v in flat.items():
        if not (isinstance(v, torch.Tensor) and v.is_floating_point() and is_moment(k)):
            out[k] = v
        elif mode == "int8" and _int8_ok(v):
            sq = k.endswith("exp_avg_sq")
            src = local_shard(v).float()
            q, s = quantize_int8(src.clamp(min=0).sqrt() if sq else src, block, round_up=sq)
            nb = -(-v.shape[-1] // block)
            out[k + INT8] = _like(v, q, tuple(v.shape))
            out[k + SCALE] = _like(v, s, (*v.shape[:-1], nb))
        else:
            out[k + BF16] = v.to(torch.bfloat16)
    return out


def stored_names(key: str, template: Any, saved: set[str]) -> list[str] | None:
    """Which stored keys hold `key` ([key], [key::bf16] or [key::int8, key::absmax]); None if none."""
    if key in saved:
        return [key]
    if isinstance(template, torch.Tensor) and is_moment(key):
        if key + BF16 in saved:
            return [key + BF16]
        if key + INT8 in saved and key + SCALE in saved:
            return [key + INT8, key + SCALE]
    return None


def template_for(name: str, template: torch.Tensor, block: int) -> torch.Tensor:
    """An empty tensor (DTensor when `template` is one) to load stored key `name` into."""
    local = local_shard(template)
    if name.endswith(BF16):
        return template.to(torch.bfloat16) if isinstance(template, DTensor) else torch.empty_like(local,
                                                                                              dtype=torch.bfloat16)
    if name.endswith(INT8):
        return _like(template, torch.empty_like(local, dtype=torch.int8), tuple(template.shape))
    nb = -(-template.shape[-1] // block)
    local_scale = torch.empty((*local.shape[:-1], -(-local.shape[-1] // block)), dtype=torch.float32,
                              device=local.device)
    return _like(template, local_scale, (*template.shape[:-1], nb))


def decode_moment(key: str, target: torch.Tensor, loaded: list[torch.Tensor], block: int) -> None:
    """Write the decoded moment into `target` in place (fp32, same layout)."""
    dst = local_shard(target)
    if len(loaded) == 1:
        dst.copy_(local_shard(loaded[0]).to(dst.dtype))
        return
    value = dequantize_int8(local_shard(loaded[0]), local_shard(loaded[1]), block)
    if key.endswith("exp_avg_sq"):
        value = value.square()
    dst.copy_(value.to(dst.dtype))


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of this rank's bytes of `t` plus dtype and shape (incremental checkpoints compare these)."""
    local = local_shard(t).detach()
    if local.device.type != "cpu":
        local = local.cpu()
    h = hashlib.sha256(f"{local.dtype}|{tuple(local.shape)}|".encode())
    if local.numel():
        h.update(local.contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()
