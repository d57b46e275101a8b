"""The green-list watermark of Kirchenbauer et al. (2023, "A Watermark for Large Language Models"):
generation adds `delta` to the logits of a keyed "green" fraction `gamma` of the vocabulary, chosen
afresh at each step from the previous `context_width` tokens; detection counts green tokens and
tests them against the `gamma` expected of text written without the key.

Green lists. A keyed hash (BLAKE2b keyed with the secret, of the context token ids) seeds a
splitmix64 value per vocabulary id; the green list is the floor(gamma * vocab) ids with the
smallest values: a keyed pseudo-random permutation cut at gamma, as the paper's PRNG-seeded
permutation, but computed by integer arithmetic alone, so it is the same on every machine and
library version (a torch or numpy generator's stream is not promised to be).

Detection (`detect`). Token t (with at least `context_width` tokens before it) is scored green or
not; z = (green - gamma T) / sqrt(T gamma (1 - gamma)) over the T scored tokens, p = the one-sided
normal tail. A (context, token) pair already scored is skipped, as Kirchenbauer et al.'s follow-up
("On the Reliability of Watermarks for LLMs", 2023) recommends: repeated n-grams are not
independent draws, and counting each repeat would inflate z on repetitive human text.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lmforge.safety.errors import SafetyError
from lmforge.safety.secret_key import WatermarkKey

__all__ = ["Detection", "GreenLists", "WatermarkConfig", "WatermarkLogitsProcessor", "detect"]

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_CACHE_ENTRIES = 16384  # packed green lists kept (vocab / 8 bytes each: 16 MiB at 8k vocabulary)


@dataclass(frozen=True)
class WatermarkConfig:
    """gamma: the green fraction; delta: the logit bias; context_width: previous tokens hashed."""

    gamma: float = 0.25
    delta: float = 2.0
    context_width: int = 1

    def validate(self) -> None:
        if not 0 < self.gamma < 1:
            raise SafetyError(f"watermark gamma = {self.gamma}: must be in (0, 1)")
        if not (math.isfinite(self.delta) and self.delta >= 0):
            raise SafetyError(f"watermark delta = {self.delta}: must be a finite number >= 0")
        if not 1 <= self.context_width <= 8:
            raise SafetyError(f"watermark context width = {self.context_width}: must be in 1..8")


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Vectorised splitmix64 finaliser (uint64 arithmetic wraps modulo 2^64)."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


class GreenLists:
    """The green list of every context, for one key, vocabulary size and gamma (cached, packed bits)."""

    def __init__(self, key: WatermarkKey, vocab_size: int, config: WatermarkConfig):
        config.validate()
        if vocab_size < 2:
            raise SafetyError(f"watermark: vocabulary of {vocab_size} ids; need at least 2")
        self._key = key
        self.vocab_size = vocab_size
        self.config = config
        self.green_count = max(1, int(config.gamma * vocab_size))
        self._ids = np.arange(vocab_size, dtype=np.uint64)
        self._cache: OrderedDict[tuple[int, ...], np.ndarray] = OrderedDict()

    def _seed(self, context: tuple[int, ...]) -> np.uint64:
        data = np.asarray(context, dtype="<i8").tobytes()
        digest = hashlib.blake2b(data, key=self._key.material, digest_size=8, person=b"lmforge-wm").digest()
        return np.uint64(int.from_bytes(digest, "little"))

    def _packed(self, context: tuple[int, ...]) -> np.ndarray:
        hit = self._cache.get(context)
        if hit is not None:
            self._cache.move_to_end(context)
            return hit
        with np.errstate(over="ignore"):
            values = _splitmix64(self._seed(context) ^ (self._ids * _GOLDEN))
        mask = np.zeros(self.vocab_size, dtype=bool)
        mask[np.argpartition(values, self.green_count - 1)[:self.green_count]] = True
        packed = np.packbits(mask)
        self._cache[context] = packed
        if len(self._cache) > _CACHE_ENTRIES:
            self._cache.popitem(last=False)
        return packed

    def mask(self, context: Sequence[int]) -> np.ndarray:
        """Boolean (vocab_size,) mask of the green ids after `context` (its last context_width ids)."""
        ctx = tuple(int(t) for t in context[-self.config.context_width:])
        return np.unpackbits(self._packed(ctx), count=self.vocab_size).astype(bool)

    def is_green(self, context: Sequence[int], token: int) -> bool:
        ctx = tuple(int(t) for t in context[-self.config.context_width:])
        packed = self._packed(ctx)
        return bool(packed[token >> 3] & (0x80 >> (token & 7)))


class WatermarkLogitsProcessor:
    """`generate(..., logits_processor=...)`: adds delta to the green logits of each row, the green
    list seeded by that row's last context_width tokens (prompt included). Applied to the raw
    logits, before temperature and top-k/top-p (as transformers' WatermarkLogitsProcessor)."""

    def __init__(self, green: GreenLists):
        self.green = green

    def __call__(self, tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[-1] < self.green.vocab_size:
            raise SafetyError(f"watermark: model vocabulary {logits.shape[-1]} is smaller than the "
                              f"watermark's {self.green.vocab_size}")
        width = self.green.config.context_width
        rows = tokens[:, -width:].tolist()
        bias = np.zeros((len(rows), logits.shape[-1]), dtype=np.float32)
        for r, ctx in enumerate(rows):
            bias[r, :self.green.vocab_size] = self.green.mask(ctx) * self.green.config.delta
        return logits + torch.from_numpy(bias).to(device=logits.device, dtype=logits.dtype)


@dataclass(frozen=True)
class Detection:
    """The z-test of one token sequence: `scored` tokens (repeats skipped), `green` of them."""

    z: float
    p_value: float
    scored: int
    green: int
    tokens: int
    gamma: float

    def as_json(self) -> dict:
        return {"z": round(self.z, 4), "p_value": self.p_value, "scored_tokens": self.scored,
                "green_tokens": self.green, "green_fraction": round(self.green / self.scored, 4) if self.scored else None,
                "tokens": self.tokens, "gamma": self.gamma}


def z_score(green: int, scored: int, gamma: float) -> float:
    if scored == 0:
        return 0.0
    return (green - gamma * scored) / math.sqrt(scored * gamma * (1 - gamma))


def one_sided_p(z: float) -> float:
    """P(Z >= z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2))


def detect(token_ids: Sequence[int], green: GreenLists, ignore_repeated: bool = True) -> Detection:
    """Score `token_ids` (a text's tokens, as the generating tokenizer encodes it). Ids outside the
    watermark's vocabulary are context only, never scored."""
    width = green.config.context_width
    ids = [int(t) for t in token_ids]
    seen: set[tuple[int, ...]] = set()
    scored = hits = 0
    for i in range(width, len(ids)):
        tok = ids[i]
        if not 0 <= tok < green.vocab_size:
            continue
        if ignore_repeated:
            pair = (*ids[i - width:i], tok)
            if pair in seen:
                continue
            seen.add(pair)
        scored += 1
        hits += green.is_green(ids[i - width:i], tok)
    z = z_score(hits, scored, green.config.gamma)
    return Detection(z, one_sided_p(z) if scored else 1.0, scored, hits, len(ids), green.config.gamma)
