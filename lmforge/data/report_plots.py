"""The report's plots as PNG data URIs (matplotlib's object API on the Agg canvas, never pyplot).

Why data URIs: the report is one HTML file that opens anywhere with no network and no other
files (`data:image/png;base64,...` images need no script and no external URL). Why Agg and no
pyplot: no display needed and no global figure state shared with the caller.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence

from lmforge.data.drift import HIST_BINS, shared_bins

__all__ = ["bar_chart", "histograms", "PLOT_DPI"]

PLOT_DPI = 100
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=PLOT_DPI)
    FigureCanvasAgg(fig)
    return fig


def _data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def histograms(panels: Mapping[str, Mapping[str, Sequence[float]]], columns: int = 3,
               density: bool = False) -> tuple[str, int, int]:
    """One histogram panel per title; each panel overlays its labelled samples on shared bins (kept
    vs removed: counts; corpus A vs B of different sizes: `density`). Returns (data URI, width px,
    height px)."""
    n = max(len(panels), 1)
    cols = min(columns, n)
    rows = (n + cols - 1) // cols
    fig = _figure(4.0 * cols, 2.8 * rows)
    for i, (title, samples) in enumerate(panels.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        edges = shared_bins([x for v in samples.values() for x in v], [], HIST_BINS)
        for j, (label, values) in enumerate(samples.items()):
            if len(values):
                ax.hist(values, bins=edges, alpha=0.55 if len(samples) > 1 else 0.9, color=COLORS[j % len(COLORS)],
                        label=f"{label} ({len(values):,})", density=density)
        ax.set_title(title, fontsize=10)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _data_uri(fig), int(4.0 * cols * PLOT_DPI), int(2.8 * rows * PLOT_DPI)


def bar_chart(counts: Mapping[str, float], title: str, xlabel: str, limit: int = 30) -> tuple[str, int, int]:
    """Horizontal bars, largest first (the first `limit`, the rest summed into "other")."""
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    if len(items) > limit:
        items = items[:limit - 1] + [("other", sum(v for _, v in items[limit - 1:]))]
    height = 1.2 + 0.3 * max(len(items), 1)
    fig = _figure(8.0, height)
    ax = fig.add_subplot()
    labels = [k for k, _ in items][::-1]
    values = [v for _, v in items][::-1]
    bars = ax.barh(labels, values, color=COLORS[0])
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=8, padding=2)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.tick_params(labelsize=8)
    ax.margins(x=0.15)
    fig.tight_layout()
    return _data_uri(fig), int(8.0 * PLOT_DPI), int(height * PLOT_DPI)
