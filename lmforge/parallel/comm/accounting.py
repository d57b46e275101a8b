"""Bytes on the wire: what this rank sends per step under each compressor, against what the same
step's plain fp32 all-reduce would send, for the trainer's metrics (`comm_bytes`,
`comm_compression_ratio`).

The model is the ring algorithms' per-rank traffic (what gloo and NCCL run for large tensors):
an all-reduce of B bytes sends 2 (W - 1) / W * B from each rank, an all-gather of P bytes per
rank sends (W - 1) * P. So on W = 2 ranks an all-gathered payload costs what it weighs, and at
larger W the all-gathered compressors (int8, int4, top-k) lose ground against a ring all-reduce
by W / 2: their ratio is computed, not assumed.
"""

from __future__ import annotations

from dataclasses import dataclass


def allreduce_bytes(nbytes: int, world: int) -> int:
    """Bytes one rank sends in a ring all-reduce of `nbytes` (reduce-scatter + all-gather)."""
    return 2 * (world - 1) * nbytes // world


def allgather_bytes(nbytes: int, world: int) -> int:
    """Bytes one rank sends in a ring all-gather of `nbytes` per rank."""
    return (world - 1) * nbytes


@dataclass
class CommAccounting:
    """Running totals (since the start) and the current window (since the last `window()` read)."""

    sent: int = 0  # bytes this rank sent
    baseline: int = 0  # bytes an fp32 all-reduce of the same gradients would have sent
    window_sent: int = 0
    window_baseline: int = 0

    def add(self, sent: int, baseline: int) -> None:
        self.sent += sent
        self.baseline += baseline
        self.window_sent += sent
        self.window_baseline += baseline

    def add_fp32_allreduce(self, sent: int, numel: int, world: int) -> None:
        """`sent` bytes for gradients of `numel` fp32 values that a plain all-reduce would have sent."""
        self.add(sent, allreduce_bytes(4 * numel, world))

    def window(self) -> dict[str, float]:
        """{"comm_bytes", "comm_compression_ratio"} of the window, which starts anew."""
        ratio = self.window_baseline / self.window_sent if self.window_sent else 0.0
        out = {"comm_bytes": float(self.window_sent), "comm_compression_ratio": ratio}
        self.window_sent = self.window_baseline = 0
        return out

    def ratio(self) -> float:
        """fp32 bytes / bytes sent since the start (0 before anything was sent)."""
        return self.baseline / self.sent if self.sent else 0.0
