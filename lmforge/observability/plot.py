"""Loss curve PNG from metrics.jsonl (train loss per step, validation loss as points).

Uses matplotlib's object API on the Agg canvas, never pyplot: no display needed and no global
figure state shared with the caller.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.observability.errors import ObservabilityError
from lmforge.observability.metrics import read_metrics
from lmforge.storage.atomic import atomic_open


def _loss_points(records: list[dict], prefix: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], float(r["loss"])) for r in records
           if r.get("prefix", "train") == prefix and isinstance(r.get("loss"), int | float)]
    return [s for s, _ in pts], [v for _, v in pts]


def plot_loss_curve(metrics_jsonl: Path | str, out_png: Path | str, log_scale: bool = False,
                    title: str | None = None) -> Path:
    """Write the loss curve of a run to `out_png` (atomically) and return its path.

    Reads records with prefix "train" (line) and "val" (points) carrying a "loss" (the format of
    MetricsLogger). Raises ObservabilityError when the file is missing or holds no train loss.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    src, out = Path(metrics_jsonl), Path(out_png)
    if not src.is_file():
        raise ObservabilityError(f"metrics file not found: {src} (written by a training run as metrics.jsonl)")
    records = read_metrics(src)
    steps, losses = _loss_points(records, "train")
    if not steps:
        raise ObservabilityError(f"no training loss records in {src}; expected JSON lines like "
                                 '{"step": 1, "prefix": "train", "loss": 3.2}')
    val_steps, val_losses = _loss_points(records, "val")

    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(steps, losses, linewidth=1.0, label="train")
    if val_steps:
        ax.plot(val_steps, val_losses, "o", markersize=4, label="validation")
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or src.parent.name or "loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()

    with atomic_open(out, "wb") as f:
        fig.savefig(f, format="png")
    return out
