"""How the watermark survives edits: detection rate after random token substitution and deletion.

The attacks are the paper's simple baselines (Kirchenbauer et al. 2023, sec. 7): each token is
replaced by a uniformly random vocabulary id (or deleted) independently with probability `rate`.
A substitution breaks the green test of the replaced token and of the `context_width` tokens whose
green list it seeds, so each edit costs about 1 + context_width scored tokens.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from lmforge.safety.errors import SafetyError
from lmforge.safety.watermark import GreenLists, detect

__all__ = ["ATTACKS", "RobustnessRow", "attack_tokens", "robustness_curve"]

ATTACKS = ("substitute", "delete")


def attack_tokens(ids: Sequence[int], kind: str, rate: float, vocab_size: int, rng: random.Random) -> list[int]:
    """`ids` with each token substituted by a random id, or deleted, with probability `rate`."""
    if kind not in ATTACKS:
        raise SafetyError(f"attack {kind!r}: must be one of {', '.join(ATTACKS)}")
    if not 0 <= rate <= 1:
        raise SafetyError(f"attack rate {rate}: must be in [0, 1]")
    out: list[int] = []
    for t in ids:
        if rng.random() < rate:
            if kind == "substitute":
                out.append(rng.randrange(vocab_size))
        else:
            out.append(int(t))
    return out


@dataclass(frozen=True)
class RobustnessRow:
    attack: str
    rate: float
    detected: int     # sequences with z > z_threshold
    total: int
    mean_z: float
    median_z: float

    @property
    def detection_rate(self) -> float:
        return self.detected / self.total if self.total else 0.0

    def as_json(self) -> dict:
        return {"attack": self.attack, "rate": self.rate, "detection_rate": round(self.detection_rate, 4),
                "detected": self.detected, "total": self.total, "mean_z": round(self.mean_z, 3),
                "median_z": round(self.median_z, 3)}


def robustness_curve(sequences: Sequence[Sequence[int]], green: GreenLists, rates: Sequence[float],
                     z_threshold: float = 4.0, attacks: Sequence[str] = ATTACKS, seed: int = 0) -> list[RobustnessRow]:
    """One row per (attack, rate): how many of `sequences` are still detected at z > z_threshold.
    Seeded per (attack, rate), so a curve is reproducible."""
    rows = []
    for kind in attacks:
        for rate in rates:
            rng = random.Random(f"{seed}:{kind}:{rate}")
            zs = sorted(detect(attack_tokens(s, kind, rate, green.vocab_size, rng), green).z for s in sequences)
            n = len(zs)
            median = (zs[(n - 1) // 2] + zs[n // 2]) / 2 if n else 0.0
            rows.append(RobustnessRow(kind, rate, sum(z > z_threshold for z in zs), n,
                                      sum(zs) / n if n else 0.0, median))
    return rows
