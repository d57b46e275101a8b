"""What `lmforge compress prune` is asked to do, checked whole before any work.

Why the defaults: as Wanda (Sun et al., 2023) and SparseGPT (Frantar & Alistarh, 2023) do, only the
linear layers inside the blocks are pruned (attention q/k/v/o and the MLP's gate/up/down); the
token embeddings, the output head and the norms stay dense (the head and embeddings hold the
vocabulary, a small share of a large model's weights but the part pruning hurts most).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from lmforge.compress.errors import CompressError

METHODS = ("magnitude", "wanda")
# The block linears by their module names (models/common/attention.py, mlp.py), in block order.
TARGETS = {
    "wq": "attention.wq", "wk": "attention.wk", "wv": "attention.wv", "wo": "attention.wo",
    "w1": "feed_forward.w1", "w3": "feed_forward.w3", "w2": "feed_forward.w2",
}
TARGET_ROLES = {"wq": "attention query", "wk": "attention key", "wv": "attention value",
                "wo": "attention output", "w1": "MLP gate", "w3": "MLP up", "w2": "MLP down"}
DEFAULT_CALIB_SAMPLES = 128
DEFAULT_RECOVER_LR = 1e-4
_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(text: str) -> tuple[int, int]:
    """"2:4" -> (2, 4): keep N of every M consecutive input weights; 0 < N < M."""
    m = _PATTERN.match(text)
    if m is None or not 0 < int(m.group(1)) < int(m.group(2)):
        raise CompressError(f"--pattern {text!r}: must be N:M with 0 < N < M (keep N of every M consecutive "
                            "input weights of a row; 2:4 is what sparse tensor cores run)")
    return int(m.group(1)), int(m.group(2))


def parse_targets(text: str) -> tuple[str, ...]:
    """"wq,wk,w2" -> the names, in block order; unknown names refused."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in TARGETS]
    if not names or unknown:
        allowed = ", ".join(f"{k} ({v})" for k, v in TARGET_ROLES.items())
        raise CompressError(f"--targets {text!r}: {'unknown ' + ', '.join(unknown) if unknown else 'empty'}; "
                            f"allowed: {allowed} (embeddings and the output head are never pruned)")
    return tuple(n for n in TARGETS if n in names)


@dataclass(frozen=True)
class PruneOptions:
    """One pruning job. Exactly one of `sparsity` (unstructured: that fraction of each pruned
    layer's weights set to zero) and `pattern` ((N, M) semi-structured) is set."""

    method: str
    sparsity: float | None = None
    pattern: tuple[int, int] | None = None
    targets: tuple[str, ...] = tuple(TARGETS)
    calib_samples: int = DEFAULT_CALIB_SAMPLES
    calib_seq_len: int | None = None  # None: the run's train.seq_len
    calib_seed: int = 0
    recover_steps: int = 0
    recover_lr: float = DEFAULT_RECOVER_LR

    def check(self) -> None:
        if self.method not in METHODS:
            raise CompressError(f"--method {self.method!r}: must be one of {', '.join(METHODS)}")
        if (self.sparsity is None) == (self.pattern is None):
            raise CompressError("give exactly one of --sparsity F (unstructured) and --pattern N:M (semi-structured)")
        if self.sparsity is not None and not 0 < self.sparsity < 1:  # NaN fails too
            raise CompressError(f"--sparsity {self.sparsity}: must be in (0, 1), the fraction of each pruned layer's "
                                "weights set to zero (0.5 = half)")
        if self.pattern is not None and not 0 < self.pattern[0] < self.pattern[1]:
            raise CompressError(f"--pattern {self.pattern[0]}:{self.pattern[1]}: must be N:M with 0 < N < M")
        unknown = [t for t in self.targets if t not in TARGETS]
        if not self.targets or unknown:
            raise CompressError(f"targets {list(self.targets)}: must be a non-empty subset of {', '.join(TARGETS)}")
        if self.calib_samples < 1:
            raise CompressError(f"--calib-samples {self.calib_samples}: must be >= 1 (windows of the train split)")
        if self.calib_seq_len is not None and self.calib_seq_len < 1:
            raise CompressError(f"--calib-seq-len {self.calib_seq_len}: must be >= 1 (tokens per calibration window)")
        if self.recover_steps < 0:
            raise CompressError(f"--recover-steps {self.recover_steps}: must be >= 0 (0: no recovery fine-tune)")
        if not (math.isfinite(self.recover_lr) and self.recover_lr > 0):
            raise CompressError(f"--recover-lr {self.recover_lr}: must be a finite number > 0")

    @property
    def needs_activations(self) -> bool:
        """Wanda scores weights by their input activations; magnitude needs none."""
        return self.method == "wanda"

    @property
    def needs_data(self) -> bool:
        return self.needs_activations or self.recover_steps > 0

    @property
    def scheme(self) -> str:
        """"50% unstructured" or "2:4 semi-structured", for tables and notes."""
        if self.pattern is not None:
            return f"{self.pattern[0]}:{self.pattern[1]} semi-structured"
        assert self.sparsity is not None
        return f"{self.sparsity:.0%} unstructured" if self.sparsity * 100 == round(self.sparsity * 100) \
            else f"{self.sparsity:g} unstructured"

    @property
    def comparison_group(self) -> str:
        """Among which weights scores are compared (each method's choice in the Wanda paper)."""
        if self.pattern is not None:
            return f"each group of {self.pattern[1]} consecutive input weights of a row"
        return "each output row (Wanda)" if self.method == "wanda" else "the whole layer (magnitude baseline)"
