"""The settings of the model watermark (lmforge/safety/model_watermark.py), apart so that the CLI can
name their defaults without importing torch when it builds its parser."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmforge.safety.errors import SafetyError

__all__ = ["MAX_BITS", "ModelWatermarkConfig"]

MAX_BITS = 512  # the message is one 64-byte BLAKE2b digest


@dataclass(frozen=True)
class ModelWatermarkConfig:
    """bits: message length; margin: the |z| each bit is embedded at; dead_zone: |z| below which a
    bit reads as erased; alpha: detected when p < alpha."""

    bits: int = 256
    margin: float = 6.0
    dead_zone: float = 1.0
    alpha: float = 1e-3

    def validate(self) -> None:
        if not 32 <= self.bits <= MAX_BITS:
            raise SafetyError(f"model watermark bits = {self.bits}: must be in 32..{MAX_BITS}")
        if not (math.isfinite(self.dead_zone) and self.dead_zone >= 0):
            raise SafetyError(f"model watermark dead zone = {self.dead_zone}: must be a finite number >= 0")
        if not (math.isfinite(self.margin) and self.margin > 0):
            raise SafetyError(f"model watermark margin = {self.margin}: must be a finite number > 0")
        if not 0 < self.alpha < 1:
            raise SafetyError(f"model watermark alpha = {self.alpha}: must be in (0, 1)")
