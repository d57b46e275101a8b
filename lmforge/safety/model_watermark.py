"""A keyed watermark in a model's weights: spread-spectrum bits embedded after training (after
Uchida et al. 2017, "Embedding Watermarks into Deep Neural Networks", done post hoc on the weights
instead of with a training regulariser), read back with the key alone.

Carrier. Every weight of the 2-D block matrices (`layers.*.weight`: attention q/k/v/o and the MLP's
gate/up/down, what quantization and pruning also touch) belongs to one of `bits` disjoint groups
with a sign s = +-1, both chosen by a keyed hash of (tensor name, flat index): BLAKE2b keyed with the
secret seeds each tensor, splitmix64 spreads the indices, as the text watermark does
(watermark.py), so the choice is integer arithmetic, the same on every machine and library version
(no torch or numpy random stream). Bit b reads the normalised projection

    z_b = sum_{j in group b} s_j w_j / sqrt(sum_{j in group b} w_j^2).

For a model not marked with this key the signs are independent of the weights, so z_b has mean 0 and
variance exactly 1 whatever the weights are, and is normal to a very good approximation (thousands
of terms per bit). The message (one bit per group) also comes from the key.

Embedding moves every weight of group b by the same amount along its sign (the least-norm change of
the group's sum s w) until each z_b, signed by its message bit, reaches `margin`; bits
already past it are left alone, exact zeros (a pruned model) stay zero. Bit b's change has norm
(margin - z_b) x the rms of its group's weights whatever the group's size, so with z_b ~ N(0, 1)
before, the whole change relative to the carrier's norm is about sqrt(bits (margin^2 + 1) / weights),
spread evenly over the weights: 7.4% on the main job's 1.77M block weights at 256 bits and margin 6,
which moves its held-out perplexity by less than 0.1% (bench/model_watermark.py).

Why it survives: z is a ratio, so a uniform shrink (weight decay) leaves it unchanged; per-weight
noise of rms sigma (fine-tuning drift; int8 per-row rounding, ~1% of the rms weight) moves z by about
sigma / rms(w) x N(0, 1), far below the margin; magnitude pruning removes the smallest weights, whose
terms carry little of either the projection or the norm. A permutation of hidden units is not
covered (a known limit of weight-space watermarks).

Reading and the p-value. Bit b reads as its message bit when z_b has the message's sign and
|z_b| >= `dead_zone`; otherwise it is an error (a flipped bit, or an erasure inside the dead zone).
p = P(X <= errors) for X ~ Binomial(bits, 1/2), computed exactly (integer binomial sums). Why a dead
zone: without one, p is uniform for a wrong key, so among 100 wrong keys one would fall below 0.01
about two times in three; with it a wrong key reads a bit right with probability P(Z >= 1) = 0.16
< 1/2, so the test stays valid (conservative) and wrong keys give p near 1, while a marked model,
whose bits sit at z >= margin, loses nothing.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from lmforge.safety.errors import SafetyError
from lmforge.safety.model_watermark_config import ModelWatermarkConfig
from lmforge.safety.secret_key import WatermarkKey
from lmforge.safety.watermark import _splitmix64

__all__ = ["EmbedReport", "ModelWatermarkConfig", "WatermarkReading", "binomial_p_value", "carrier_tensors",
           "embed_watermark", "message_bits", "read_watermark"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_PERSON = b"lmforge-model-wm"  # BLAKE2b personalisation: no hash shared with the text watermark
DEFAULT = ModelWatermarkConfig()
MIN_WEIGHTS_PER_BIT = 64  # the normal approximation of z under a wrong key needs many terms


def carrier_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """The tensors that carry the mark, sorted by name: 2-D floating-point `layers.*.weight`."""
    out = [(n, t) for n, t in named if n.startswith("layers.") and n.endswith(".weight") and t.ndim == 2
           and t.is_floating_point()]
    if not out:
        raise SafetyError("model watermark: the model has no block weight matrices (layers.*.weight, 2-D) to carry it")
    return sorted(out, key=lambda nt: nt[0])


def message_bits(key: WatermarkKey, bits: int) -> torch.Tensor:
    """The key's message: (bits,) of +1 / -1 (float64)."""
    digest = hashlib.blake2b(b"message", key=key.material, digest_size=64, person=_PERSON).digest()
    b = np.unpackbits(np.frombuffer(digest, dtype=np.uint8))[:bits]
    return torch.from_numpy(b.astype(np.float64) * 2 - 1)


def _assignment(key: WatermarkKey, name: str, numel: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(group index int16, sign int8 +-1) of each flat index of tensor `name` under `key` (3 bytes a
    weight kept; widened per tensor when used)."""
    digest = hashlib.blake2b(name.encode(), key=key.material, digest_size=8, person=_PERSON).digest()
    seed = np.uint64(int.from_bytes(digest, "little"))
    with np.errstate(over="ignore"):
        h = _splitmix64(seed ^ (np.arange(numel, dtype=np.uint64) * _GOLDEN))
    group = (h % np.uint64(bits)).astype(np.int16)
    sign = (h >> np.uint64(63)).astype(np.int8) * 2 - 1
    return torch.from_numpy(group), torch.from_numpy(sign)


class _Carrier:
    """The carrier tensors with their key-chosen groups and signs, computed once."""

    def __init__(self, named: Iterable[tuple[str, torch.Tensor]], key: WatermarkKey, bits: int):
        self.tensors = carrier_tensors(named)
        self.bits = bits
        self.assign = [_assignment(key, n, t.numel(), bits) for n, t in self.tensors]
        self.weights = sum(t.numel() for _, t in self.tensors)
        if self.weights < bits * MIN_WEIGHTS_PER_BIT:
            raise SafetyError(f"model watermark: {self.weights} block weights for {bits} bits; need at least "
                              f"{MIN_WEIGHTS_PER_BIT} per bit (use fewer bits)")

    def sums(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per group: sum s*w, sum w^2, count of nonzero weights (float64)."""
        proj, sq, live = (torch.zeros(self.bits, dtype=torch.float64) for _ in range(3))
        for (_, t), (group, sign) in zip(self.tensors, self.assign, strict=True):
            w, g = t.detach().reshape(-1).to("cpu", torch.float64), group.long()
            proj.index_add_(0, g, sign.double() * w)
            sq.index_add_(0, g, w * w)
            live.index_add_(0, g, (w != 0).to(torch.float64))
        return proj, sq, live

    def z(self) -> torch.Tensor:
        proj, sq, _ = self.sums()
        return proj / sq.sqrt().clamp(min=1e-300)


@dataclass(frozen=True)
class EmbedReport:
    """What embedding did: bits, carrier size, z before and after (signed by the message), and the
    size of the change relative to the carrier weights."""

    bits: int
    tensors: int
    weights: int
    margin: float
    z_min_before: float
    z_min_after: float
    bits_moved: int
    relative_change: float  # ||delta|| / ||W|| over the carrier weights (the shifts applied, before rounding)
    max_abs_change: float  # the largest shift of one weight

    def as_json(self) -> dict:
        return dict(self.__dict__)


def embed_watermark(model: torch.nn.Module, key: WatermarkKey, cfg: ModelWatermarkConfig = DEFAULT,
                    max_rounds: int = 8) -> EmbedReport:
    """Mark `model`'s weights in place (see the module docstring). A bit's change is recomputed a
    few rounds because raising a projection also grows the group's norm a little."""
    cfg.validate()
    if cfg.margin <= cfg.dead_zone:
        raise SafetyError(f"model watermark margin = {cfg.margin:g}: must be above the dead zone ({cfg.dead_zone:g}), "
                          "or the marked bits would read as erased")
    carrier = _Carrier(model.named_parameters(), key, cfg.bits)
    msg = message_bits(key, cfg.bits)
    proj, sq, live = carrier.sums()
    z0, norm_sq = proj / sq.sqrt().clamp(min=1e-300) * msg, float(sq.sum())
    shift = torch.zeros(cfg.bits, dtype=torch.float64)  # the total move of each live weight of a group, along its sign
    target = cfg.margin * (1 + 1e-6)
    with torch.no_grad():
        for _ in range(max_rounds):
            z = proj / sq.sqrt().clamp(min=1e-300) * msg
            need = (target - z).clamp(min=0)
            if not bool((need > 0).any()):
                break
            step = need * sq.sqrt() / live.clamp(min=1) * msg
            shift += step
            for (_, t), (group, sign) in zip(carrier.tensors, carrier.assign, strict=True):
                flat = t.detach().reshape(-1)
                delta = step[group.long()] * sign.double() * (flat != 0).to("cpu", torch.float64)
                flat.add_(delta.to(flat.device, flat.dtype))
            proj, sq, live = carrier.sums()
    z1 = proj / sq.sqrt().clamp(min=1e-300) * msg
    if float(z1.min()) < cfg.margin * 0.99:
        raise SafetyError(f"model watermark: reached z = {float(z1.min()):.3f} of margin {cfg.margin:g} after "
                          f"{max_rounds} rounds (weights of dtype {carrier.tensors[0][1].dtype} too coarse?)")
    change_sq = float((live * shift * shift).sum())
    return EmbedReport(bits=cfg.bits, tensors=len(carrier.tensors), weights=carrier.weights, margin=cfg.margin,
                       z_min_before=float(z0.min()), z_min_after=float(z1.min()), bits_moved=int((z0 < cfg.margin).sum()),
                       relative_change=math.sqrt(change_sq / max(norm_sq, 1e-300)),
                       max_abs_change=float(shift[live > 0].abs().max()) if bool((live > 0).any()) else 0.0)


def binomial_p_value(errors: int, n: int) -> float:
    """P(X <= errors), X ~ Binomial(n, 1/2), exactly: Python's int / int is correctly rounded, so
    2^-256 is 8.6e-78, not an underflow or a normal approximation's tail."""
    if not 0 <= errors <= n:
        raise ValueError(f"errors {errors} outside 0..{n}")
    return sum(math.comb(n, i) for i in range(errors + 1)) / 2 ** n


@dataclass(frozen=True)
class WatermarkReading:
    """The bits read with a key: `read` has '1'/'0' per bit as read (message order) and '?' for an
    erasure; errors = flipped + erased; p: one-sided binomial (module docstring)."""

    bits: int
    read: str
    flipped: int
    erased: int
    p_value: float
    z_min: float
    z_median: float
    dead_zone: float
    alpha: float

    @property
    def errors(self) -> int:
        return self.flipped + self.erased

    @property
    def bit_error_rate(self) -> float:
        return self.errors / self.bits

    @property
    def detected(self) -> bool:
        return self.p_value < self.alpha

    def as_json(self) -> dict:
        return {"bits": self.bits, "read": self.read, "errors": self.errors, "flipped": self.flipped,
                "erased": self.erased, "bit_error_rate": self.bit_error_rate, "p_value": self.p_value,
                "z_min": self.z_min, "z_median": self.z_median, "dead_zone": self.dead_zone, "alpha": self.alpha,
                "detected": self.detected}


def read_watermark(named: Iterable[tuple[str, torch.Tensor]], key: WatermarkKey,
                   cfg: ModelWatermarkConfig = DEFAULT) -> WatermarkReading:
    """Read the mark of `key` from named weights (a model's `named_parameters()` or a state dict's
    items; fp32 copies of quantized weights)."""
    cfg.validate()
    carrier = _Carrier(named, key, cfg.bits)
    msg = message_bits(key, cfg.bits)
    z = carrier.z()
    signed = z * msg
    erased = signed.abs() < cfg.dead_zone
    flipped = (signed < 0) & ~erased
    chars = np.where(erased.numpy(), "?", np.where((z > 0).numpy(), "1", "0"))
    errors = int(erased.sum() + flipped.sum())
    return WatermarkReading(bits=cfg.bits, read="".join(chars.tolist()), flipped=int(flipped.sum()),
                            erased=int(erased.sum()), p_value=binomial_p_value(errors, cfg.bits),
                            z_min=float(signed.min()), z_median=float(signed.median()), dead_zone=cfg.dead_zone,
                            alpha=cfg.alpha)
