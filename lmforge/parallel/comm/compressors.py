"""Gradient compressors: encode a flat fp32 gradient into the tensors that go on the wire, decode
them back, and say how many bytes that is.

A bucket of DDP is several parameters laid end to end; every compressor here works per
parameter (`numels`: the lengths of the segments), so what a value becomes never depends on where
DDP put its parameter in a bucket: DDP lays buckets out once in parameter order and again in
gradient order after the first step, and a resumed run sees the first layout again where the
straight run saw the second (bit-equal resume needs the same numbers in both).

- `CastCompressor` (bf16 / fp16): the values in half width; summed in that dtype by all_reduce
  (fp32: the plain all-reduce, for a warm-up that sends the gradients as they are).
- `BlockQuantCompressor` (int8 / int4 / int2): one fp32 absmax scale per `block` values of a
  parameter (blocks never span two parameters), rounded to the nearest level; int4 packs two per
  byte, int2 (ternary) four.
  Summing int8 on the wire wraps around (gloo), so these payloads are all-gathered and decoded.
- `TopKCompressor`: the ceil(fraction * n) largest magnitudes of each parameter, fp32 values and
  int32 positions in the bucket; all-gathered (sparse sums do not stay sparse). `compact`: bf16
  values and 16-bit positions inside 64 Ki-value windows of the bucket, packed in one int32 per value,
  plus one int32 count per window (4 bytes a value instead of 8; what bf16 rounds off stays in the
  error-feedback residual).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from lmforge.config.comm import CommConfig

Payload = list[torch.Tensor]
SAMPLE_MIN = 2048  # top-k: values sampled per parameter, at least, to place the threshold
WINDOW_BITS = 16  # compact top-k: positions are sent as their low 16 bits, windows as counts


class Compressor(ABC):
    """encode/decode of one bucket; `summable`: the payload can be all-reduced as is (a cast),
    else it is all-gathered and every rank decodes and sums every rank's payload."""

    summable: bool = False

    @abstractmethod
    def encode(self, x: torch.Tensor, numels: tuple[int, ...]) -> Payload:
        """The wire tensors for the flat fp32 `x` (sum(numels) values)."""

    @abstractmethod
    def decode(self, payload: Payload, numels: tuple[int, ...]) -> torch.Tensor:
        """Flat fp32 values from `encode`'s output (or from the sum of several, when summable)."""

    @abstractmethod
    def wire_bytes(self, numels: tuple[int, ...]) -> int:
        """Bytes of one rank's payload for a bucket of these segments."""

    def roundtrip(self, x: torch.Tensor, numels: tuple[int, ...]) -> tuple[Payload, torch.Tensor]:
        """encode, and what this rank's payload decodes to (error feedback keeps the difference)."""
        payload = self.encode(x, numels)
        return payload, self.decode(payload, numels)

    def sum_gathered(self, gathered: list[list[torch.Tensor]], local: torch.Tensor, me: int,
                     numels: tuple[int, ...], out: torch.Tensor) -> torch.Tensor:
        """Into `out`, the sum of every rank's decoded payload (`gathered`: per payload tensor, every
        rank's copy), in rank order so every rank gets the same bits; this rank's own is `local`,
        decoded already."""
        for r in range(len(gathered[0])):
            decoded = local if r == me else self.decode([parts[r] for parts in gathered], numels)
            if r == 0:
                out.copy_(decoded)
            else:
                out.add_(decoded)
        return out


class CastCompressor(Compressor):
    summable = True

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def encode(self, x: torch.Tensor, numels: tuple[int, ...]) -> Payload:
        return [x.to(self.dtype)]

    def decode(self, payload: Payload, numels: tuple[int, ...]) -> torch.Tensor:
        return payload[0].to(torch.float32)

    def wire_bytes(self, numels: tuple[int, ...]) -> int:
        return sum(numels) * torch.finfo(self.dtype).bits // 8


class _Segments:
    """Where each parameter's values go in a layout padded so each parameter starts a new block.
    When every parameter fills whole blocks (the usual case: widths are multiples of the block)
    the layout is the bucket itself and padding costs nothing; otherwise each parameter is copied
    to its place (a slice copy per parameter, no per-value index)."""

    def __init__(self, numels: tuple[int, ...], block: int) -> None:
        self.numels = numels
        self.padded = tuple(math.ceil(n / block) * block for n in numels)
        self.padded_len = sum(self.padded)
        self.aligned = self.padded == numels

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        if self.aligned:
            return x
        out = x.new_zeros(self.padded_len)
        for src, dst in zip(x.split(self.numels), out.split(self.padded)):
            dst[:src.numel()] = src
        return out

    def unpad(self, values: torch.Tensor) -> torch.Tensor:
        if self.aligned:
            return values
        return torch.cat([v[:n] for v, n in zip(values.split(self.padded), self.numels)])


class BlockQuantCompressor(Compressor):
    """Symmetric absmax quantisation: |x - decode(encode(x))| <= absmax(block) / (2 * qmax).
    int2 is ternary: -1, 0, +1 times the block's absmax (what error feedback needs to carry the
    rest), four values per byte."""

    def __init__(self, bits: int, block: int) -> None:
        if bits not in (2, 4, 8) or block <= 0 or block % (8 // bits):
            raise ValueError(f"bits {bits} / block {block}: need 8, 4 or 2 bits and a block of whole bytes "
                             f"({8 // bits if bits in (2, 4, 8) else 1} values a byte)")
        self.bits, self.block = bits, block
        self.qmax = 2 ** (bits - 1) - 1  # 127, 7 or 1: symmetric, so -qmax..qmax
        self._layouts: dict[tuple[int, ...], _Segments] = {}  # derived from the numels only

    def _segments(self, numels: tuple[int, ...]) -> _Segments:
        seg = self._layouts.get(numels)
        if seg is None:
            seg = self._layouts[numels] = _Segments(numels, self.block)
        return seg

    def encode(self, x: torch.Tensor, numels: tuple[int, ...]) -> Payload:
        blocks = self._segments(numels).pad(x.float()).view(-1, self.block)
        absmax = blocks.abs().amax(dim=1)
        scale = torch.where(absmax > 0, absmax / self.qmax, torch.ones_like(absmax))
        # one temporary: divide, then round and clamp in place (the same values as round(x / s))
        q = torch.div(blocks, scale[:, None]).round_().clamp_(-self.qmax, self.qmax).to(torch.int8)
        if self.bits < 8:  # 8 / bits values per byte, offset to 1..2^bits - 1, the first in the low bits
            u = (q + (self.qmax + 1)).to(torch.uint8).view(-1, 8 // self.bits)
            packed = u[:, 0].clone()
            for i in range(1, u.shape[1]):
                packed |= u[:, i] << (i * self.bits)
            q = packed.view(torch.int8)
        return [q.reshape(-1), scale]

    def decode(self, payload: Payload, numels: tuple[int, ...]) -> torch.Tensor:
        q, scale = payload
        if self.bits < 8:
            u, mask = q.view(torch.uint8), (1 << self.bits) - 1
            fields = [(u >> (i * self.bits)) & mask for i in range(8 // self.bits)]
            q = torch.stack(fields, dim=1).to(torch.int8) - (self.qmax + 1)
        values = (q.view(-1, self.block).to(torch.float32) * scale[:, None]).reshape(-1)
        return self._segments(numels).unpad(values)

    def wire_bytes(self, numels: tuple[int, ...]) -> int:
        n_blocks = sum(math.ceil(n / self.block) for n in numels)
        return n_blocks * (self.block * self.bits // 8 + 4)


class TopKCompressor(Compressor):
    """Per parameter the k = ceil(fraction * n) largest |values| exactly; the rest 0, each of them
    no larger in magnitude than the smallest kept one of its parameter."""

    def __init__(self, fraction: float, compact: bool = False) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"top-k fraction {fraction} must be in (0, 1]")
        self.fraction = fraction
        self.compact = compact
        self._samples: dict[int, torch.Tensor] = {}  # parameter length -> sampled positions

    def ks(self, numels: tuple[int, ...]) -> list[int]:
        return [max(1, math.ceil(self.fraction * n)) if n else 0 for n in numels]

    def _sample(self, n: int) -> torch.Tensor:
        idx = self._samples.get(n)
        if idx is None:  # fixed positions per length: every rank and every step picks the same way
            gen = torch.Generator().manual_seed(n)
            idx = self._samples[n] = torch.randint(0, n, (max(SAMPLE_MIN, n // 50),), generator=gen)
        return idx

    def _largest(self, mag: torch.Tensor, k: int) -> torch.Tensor:
        """Positions of the k largest of `mag`. A full top-k over millions of values is the cost of
        this compressor on CPU; a threshold from a sample (the value ~2k of n exceed) keeps a few
        times k candidates, and the top-k of those is exact whenever at least k pass it (else the
        full top-k runs): the k-th largest then is at or above the threshold."""
        n = mag.numel()
        if n < 4 * SAMPLE_MIN or 4 * k > n:
            return torch.topk(mag, k, sorted=False).indices
        sample = mag[self._sample(n)]
        m = sample.numel()
        above = min(m, math.ceil(2 * k * m / n))
        threshold = torch.kthvalue(sample, m - above + 1).values
        candidates = (mag >= threshold).nonzero().squeeze(1)
        if candidates.numel() < k:
            return torch.topk(mag, k, sorted=False).indices
        return candidates[torch.topk(mag[candidates], k, sorted=False).indices]

    def encode(self, x: torch.Tensor, numels: tuple[int, ...],
               divisors: list[torch.Tensor | None] | None = None) -> Payload:
        """`divisors` (per parameter, or None): pick the k largest |x| / divisor instead (the values
        sent are x's): with AdamW's second moment frozen, the values whose update would be largest."""
        if sum(numels) >= 2**31:
            raise ValueError(f"a bucket of {sum(numels)} values does not fit int32 positions")
        values, indices, start = [], [], 0
        for i, (n, k) in enumerate(zip(numels, self.ks(numels))):
            seg = x[start:start + n]
            div = divisors[i] if divisors is not None else None
            idx = self._largest(seg.abs() if div is None else seg.abs().div_(div.view(-1)), k)
            if self.compact:
                idx = idx.sort().values  # the windows' counts below need bucket order
            values.append(seg[idx])
            indices.append(idx + start)
            start += n
        value, index = torch.cat(values).float(), torch.cat(indices)
        if not self.compact:
            return [value, index.to(torch.int32)]
        counts = torch.bincount(index >> WINDOW_BITS, minlength=self._windows(numels)).to(torch.int32)
        bits = value.to(torch.bfloat16).view(torch.int16).long() & 0xFFFF
        packed = _as_signed((bits << 16) | (index & 0xFFFF), 32)  # gloo sends no 16-bit integers
        return [packed.to(torch.int32), counts]

    def decode(self, payload: Payload, numels: tuple[int, ...]) -> torch.Tensor:
        if not self.compact:
            values, indices = payload
            out = values.new_zeros(sum(numels))
            out[indices.long()] = values
            return out
        packed, counts = payload
        word = packed.long() & 0xFFFFFFFF
        # on the payload's device (a CUDA bucket under NCCL), never the default one
        window = torch.repeat_interleave(torch.arange(counts.numel(), device=packed.device), counts.long())
        values = _as_signed(word >> 16, 16).to(torch.int16).view(torch.bfloat16).float()
        out = packed.new_zeros(sum(numels), dtype=torch.float32)
        out[(window << WINDOW_BITS) | (word & 0xFFFF)] = values
        return out

    def wire_bytes(self, numels: tuple[int, ...]) -> int:
        if self.compact:
            return sum(self.ks(numels)) * (2 + 2) + 4 * self._windows(numels)
        return sum(self.ks(numels)) * (4 + 4)

    @staticmethod
    def _windows(numels: tuple[int, ...]) -> int:
        return -(-sum(numels) >> WINDOW_BITS) or 1


def _as_signed(x: torch.Tensor, bits: int) -> torch.Tensor:
    """int64 values in [0, 2^bits) as the signed `bits`-bit integers with the same bits (still int64),
    so that the cast to that width keeps them."""
    return x - ((x >> (bits - 1)) << bits)


def build_compressor(cfg: CommConfig, kind: str | None = None) -> Compressor:
    """The compressor `kind` (default `cfg.compression`) names, with `cfg`'s settings. "none" is
    the plain fp32 all-reduce (a warm-up's: comm.warmup_compression); "powersgd" is not
    element-wise (torch's own hook)."""
    kind = kind or cfg.compression
    if kind == "none":
        return CastCompressor(torch.float32)
    if kind in ("bf16", "fp16"):
        return CastCompressor(torch.bfloat16 if kind == "bf16" else torch.float16)
    if kind in ("int8", "int4", "int2"):
        return BlockQuantCompressor(int(kind[3:]), cfg.quant_block)
    if kind == "topk":
        return TopKCompressor(cfg.topk_fraction, compact=cfg.topk_payload == "compact")
    raise ValueError(f"no element-wise compressor for comm.compression = {kind!r}")
