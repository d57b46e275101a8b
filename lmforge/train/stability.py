"""Training stability policy: what to do with a step whose loss or gradients look wrong.

Per optimizer step the trainer hands `StabilityPolicy.check` the *global* loss (mean over
data-parallel ranks) and the global gradient norm, so every rank reaches the same verdict:

- "nonfinite": NaN/inf loss or gradient norm -> the optimizer step is skipped (weights and
  optimizer state unchanged; the batch is consumed). Under fp16 a non-finite *gradient* with a
  finite loss is a loss-scale overflow, which GradScaler already handles (skip + halve the scale):
  verdict "overflow", counted apart.
- "spike": the loss's z-score against the window of recent accepted losses exceeds
  `spike_zscore` -> the step is skipped the same way. Spikes never enter the window.
- "rollback": the `max_consecutive_spikes`-th spike in a row -> the trainer reloads the newest
  valid checkpoint saved before the first of these spikes and tells the loader to skip the
  spiking batches (their global stream positions), so they are not replayed.

Cost: the verdict needs both values on the host every step (one all-reduce of a scalar plus a
device sync); with the policy off (the default) nothing of this runs.
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from lmforge.config.job import StabilityConfig

Verdict = Literal["ok", "nonfinite", "overflow", "spike", "rollback"]


class TrainingDivergedError(RuntimeError):
    """More rollbacks than `stability.max_rollbacks`: the run keeps spiking; a human must look."""


@dataclass
class StepCheck:
    verdict: Verdict
    zscore: float = 0.0
    # Global loader position ranges [start, end) of the spiking steps that caused a rollback.
    spike_ranges: list[tuple[int, int]] = field(default_factory=list)
    first_spike_step: int = 0

    @property
    def skip(self) -> bool:
        return self.verdict != "ok"


class StabilityPolicy:
    """Decides per step; counts events. Same inputs on every rank -> same decisions."""

    def __init__(self, cfg: StabilityConfig, loss_scaling: bool = False) -> None:
        self.cfg = cfg
        self.loss_scaling = loss_scaling
        self.window: deque[float] = deque(maxlen=cfg.spike_window)
        self.nonfinite_skips = 0
        self.overflow_skips = 0
        self.spike_skips = 0
        self.rollbacks = 0
        self._run: list[tuple[int, int, int]] = []  # current run of consecutive spikes: (step, start, end)

    def zscore(self, loss: float) -> float:
        """How many standard deviations `loss` lies above the window's mean (0 without enough history)."""
        n = len(self.window)
        if n < self.cfg.spike_min_history:
            return 0.0
        mean = sum(self.window) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in self.window) / (n - 1))
        return (loss - mean) / max(std, 1e-6 * max(abs(mean), 1.0))

    def check(self, step: int, loss: float, grad_norm: float, positions: tuple[int, int]) -> StepCheck:
        """Verdict for optimizer step `step` whose batch covered global loader positions
        [positions[0], positions[1])."""
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            if self.loss_scaling and math.isfinite(loss):
                self.overflow_skips += 1
                return StepCheck("overflow")
            if self.cfg.skip_nonfinite:
                self.nonfinite_skips += 1
                return StepCheck("nonfinite")
            return StepCheck("ok")
        z = self.zscore(loss)
        if self.cfg.spike_zscore > 0 and z > self.cfg.spike_zscore:
            self.spike_skips += 1
            self._run.append((step, *positions))
            if self.cfg.max_consecutive_spikes and len(self._run) >= self.cfg.max_consecutive_spikes:
                run, self._run = self._run, []
                self.rollbacks += 1
                if self.rollbacks > self.cfg.max_rollbacks:
                    raise TrainingDivergedError(
                        f"step {step}: {self.rollbacks} loss-spike rollbacks, more than stability.max_rollbacks = "
                        f"{self.cfg.max_rollbacks}; the run does not recover by skipping data")
                return StepCheck("rollback", z, [(s, e) for _, s, e in run], run[0][0])
            return StepCheck("spike", z)
        self._run = []
        self.window.append(loss)
        return StepCheck("ok", z)

    def counters(self) -> dict[str, int]:
        return {"skipped_nonfinite": self.nonfinite_skips, "skipped_overflow": self.overflow_skips,
                "skipped_spikes": self.spike_skips, "rollbacks": self.rollbacks}

    # -- state: one JSON string (DCP saves a str as bytes; a list would be flattened by length) --

    def state_dict(self) -> dict[str, str]:
        return {"json": json.dumps({**self.counters(), "window": list(self.window), "run": self._run})}

    def load_state_dict(self, sd: dict[str, str]) -> None:
        d = json.loads(sd["json"])
        self.nonfinite_skips, self.overflow_skips = int(d["skipped_nonfinite"]), int(d["skipped_overflow"])
        self.spike_skips, self.rollbacks = int(d["skipped_spikes"]), int(d["rollbacks"])
        self.window = deque((float(v) for v in d["window"]), maxlen=self.cfg.spike_window)
        self._run = [tuple(int(v) for v in r) for r in d["run"]]  # type: ignore[misc]
