"""Throughput and MFU, memory, and the metrics log (JSONL + TensorBoard).

The JSONL record, one line per `MetricsLogger.log` call, flat so any tool can read it::

    {"step": 120, "prefix": "train", "time": 1718000000.123, "loss": 3.21, "lr": 0.0003, ...}

`step` (int), `prefix` ("train", "val", ...) and `time` (Unix seconds) are reserved; every other
key is a metric name, unprefixed, with an int or float value. The file is strict JSON: a NaN or
infinite value is written as null and named in a "nonfinite" entry ({"loss": null, "nonfinite":
{"loss": "nan"}}); `read_metrics` turns it back into the float. A resumed run appends to the same
file, so a step may appear twice after a crash; readers keep the last record of each (prefix, step).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.storage.layout import RunDir
from lmforge.storage.strict_json import NONFINITE_KEY, dumps_strict, restore_nonfinite

RESERVED_KEYS = ("step", "prefix", "time", NONFINITE_KEY)
GIB = float(1 << 30)


# -- throughput ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Throughput:
    tokens_per_s: float  # all devices together
    tokens_per_s_per_device: float
    model_flops_per_s_per_device: float
    mfu: float  # fraction in [0, 1]; 0.0 when the peak is unknown

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def throughput(tokens: float, seconds: float, flops_per_token: float, peak_flops: float | None,
               world_size: int = 1) -> Throughput:
    """tokens: processed by all `world_size` devices in `seconds`; peak_flops: of ONE device.

    mfu = (tokens / seconds) * flops_per_token / (peak_flops * world_size).
    """
    if seconds <= 0:
        raise ValueError(f"throughput needs seconds > 0, got {seconds}")
    if world_size < 1:
        raise ValueError(f"throughput needs world_size >= 1, got {world_size}")
    tps = tokens / seconds
    per_device_flops = tps * flops_per_token / world_size
    mfu = per_device_flops / peak_flops if peak_flops else 0.0
    return Throughput(tps, tps / world_size, per_device_flops, mfu)


def stale_peak_warning(mfu: float, peak_flops: float) -> str | None:
    """One line when MFU reads over 100%: the peak it divides by is wrong, not the run (measured while
    the machine was slower; a shared VM's matmul speed moves by +-15% within minutes)."""
    if mfu <= 1.0:
        return None
    return (f"warning: MFU reads {mfu:.0%}: the peak it divides by ({peak_flops / 1e9:,.1f} GFLOP/s per device) "
            "is below what this run achieves, e.g. measured while the machine was busy; re-measure it on a quiet "
            "machine with `lmforge bench peak --force` (or set metrics.peak_flops)")


class StepTimer:
    """Wall-clock window over training steps, for tokens/s and MFU between two log lines.

    `add(tokens)` after each optimizer step (global tokens, all ranks); wrap evaluation or
    checkpointing in `with timer.paused():` so they are not charged to throughput; `measure()`
    returns the window's Throughput and starts a new window. Pass `device` to synchronise CUDA
    before reading the clock (kernels run asynchronously).
    """

    def __init__(self, flops_per_token: float, peak_flops: float | None, world_size: int = 1,
                 device: torch.device | None = None):
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.world_size = world_size
        self.device = device
        self.start()

    def _now(self) -> float:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self) -> None:
        """Begin a new, empty window."""
        self.tokens = 0
        self.steps = 0
        self.excluded = 0.0
        self._t0 = self._now()

    def add(self, tokens: int) -> None:
        self.tokens += tokens
        self.steps += 1

    def paused(self) -> _Pause:
        return _Pause(self)

    def elapsed(self) -> float:
        return self._now() - self._t0 - self.excluded

    def measure(self, reset: bool = True, flops: float | None = None) -> Throughput:
        """`flops`: the window's counted training FLOPs (all ranks), when known exactly (document
        masking: observability/step_flops.py); else tokens x flops_per_token."""
        seconds = max(self.elapsed(), 1e-9)
        per_token = flops / self.tokens if flops is not None and self.tokens else self.flops_per_token
        result = throughput(self.tokens, seconds, per_token, self.peak_flops, self.world_size)
        if reset:
            self.start()
        return result


class _Pause:
    def __init__(self, timer: StepTimer):
        self.timer = timer

    def __enter__(self) -> None:
        self._t = self.timer._now()

    def __exit__(self, *exc: object) -> None:
        self.timer.excluded += self.timer._now() - self._t


# -- memory --------------------------------------------------------------------------------------


def _current_rss_bytes() -> int | None:
    try:  # Linux: resident pages are the second field
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil  # optional; not a dependency
    except ImportError:
        return None
    return int(psutil.Process().memory_info().rss)


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def memory_stats(device: torch.device | str) -> dict[str, float]:
    """Memory of this process in GiB, as metrics.

    CUDA: mem_max_allocated_gib (peak held by tensors) and mem_max_reserved_gib (peak held by
    the caching allocator, what nvidia-smi sees), since process start or the last
    torch.cuda.reset_peak_memory_stats. CPU: mem_rss_gib (resident now) and mem_max_rss_gib (peak
    resident since process start).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return {"mem_max_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
                "mem_max_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB}
    stats = {"mem_max_rss_gib": _peak_rss_bytes() / GIB}
    rss = _current_rss_bytes()
    if rss is not None:
        stats["mem_rss_gib"] = rss / GIB
    return stats


# -- logging -------------------------------------------------------------------------------------


def _number(key: str, value: Any) -> int | float:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"metric {key!r} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}: {value!r}") from None


class MetricsLogger:
    """One JSON line per `log` call in out_dir/metrics.jsonl, and TensorBoard scalars in out_dir/tb.

    The JSONL file is opened in append mode and flushed after every line, so a crash loses
    nothing already logged and a resumed run continues the same file. `enabled=False` (ranks
    other than 0) makes every method a no-op. `purge_step`: on resume, TensorBoard hides events
    at or after this step that a crashed run wrote (its records are superseded).
    """

    def __init__(self, out_dir: Path | str, jsonl: bool = True, tensorboard: bool = True, enabled: bool = True,
                 purge_step: int | None = None):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if jsonl:
            path = self.jsonl_path
            # A crash mid-line would glue the next record to a partial one: end it first.
            needs_newline = path.exists() and path.stat().st_size > 0 and not _ends_with_newline(path)
            self._file = path.open("a", encoding="utf-8")
            if needs_newline:
                self._file.write("\n")
                self._file.flush()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(RunDir(self.out_dir).tensorboard), purge_step=purge_step)

    @property
    def jsonl_path(self) -> Path:
        return RunDir(self.out_dir).metrics

    def log(self, step: int, metrics: Mapping[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        clash = [k for k in metrics if k in RESERVED_KEYS]
        if clash:
            raise ValueError(f"metric names {clash} are reserved in the metrics record ({', '.join(RESERVED_KEYS)})")
        values = {k: _number(k, v) for k, v in metrics.items()}
        if self._file is not None:
            record = {"step": int(step), "prefix": prefix, "time": round(time.time(), 3), **values}
            self._file.write(dumps_strict(record) + "\n")  # NaN/inf -> null + "nonfinite"
            self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"{prefix}/{k}", v, int(step))

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def read_metrics(path: Path | str, prefix: str | None = None) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl, the last one per (prefix, step) (a resumed run rewrites the
    steps after its checkpoint), sorted by step; unparseable lines (a crash mid-write) skipped."""
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rec = restore_nonfinite(json.loads(line))  # null + "nonfinite" flag -> NaN/inf again
        except ValueError:
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            continue
        p = rec.get("prefix", "train")
        if prefix is None or p == prefix:
            latest[(p, rec["step"])] = rec
    return sorted(latest.values(), key=lambda r: (r["step"], r.get("prefix", "train")))
