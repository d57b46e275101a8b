"""Loss curve PNG from metrics.jsonl."""

from __future__ import annotations

from pathlib import Path
from statistics import median

import pytest

from lmforge.observability.errors import ObservabilityError
from lmforge.observability.metrics import MetricsLogger
from lmforge.observability.plot import plot_loss_curve

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _run_dir(tmp_path: Path) -> Path:
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for step in range(1, 21):
            log.log(step, {"loss": 5.0 / step, "lr": 1e-3})
            if step % 5 == 0:
                log.log(step, {"loss": 6.0 / step}, prefix="val")
    return tmp_path / "metrics.jsonl"


@pytest.mark.parametrize("log_scale", [False, True])
def test_png_written_atomically(tmp_path: Path, log_scale: bool) -> None:
    src = _run_dir(tmp_path)
    out = plot_loss_curve(src, tmp_path / "plots" / "loss.png", log_scale=log_scale)
    assert out == tmp_path / "plots" / "loss.png"
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 5000
    assert [p.name for p in out.parent.iterdir()] == ["loss.png"]  # no temp file left behind
    # Overwriting replaces the file in one step.
    assert plot_loss_curve(src, out).read_bytes()[:8] == PNG_SIGNATURE


def test_missing_and_empty_metrics(tmp_path: Path) -> None:
    with pytest.raises(ObservabilityError, match="metrics file not found: .*nope.jsonl"):
        plot_loss_curve(tmp_path / "nope.jsonl", tmp_path / "loss.png")
    empty = tmp_path / "metrics.jsonl"
    empty.write_text("")
    with pytest.raises(ObservabilityError, match="no training loss records in .*metrics.jsonl"):
        plot_loss_curve(empty, tmp_path / "loss.png")
    empty.write_text('{"step": 1, "prefix": "val", "loss": 2.0}\nnot json\n')
    with pytest.raises(ObservabilityError, match="no training loss records"):
        plot_loss_curve(empty, tmp_path / "loss.png")
    assert not (tmp_path / "loss.png").exists()



def _line_pixels(png: Path, rgb: tuple[float, float, float]) -> tuple[list[int], list[float]]:
    """(columns, lowest row) of the pixels drawn in colour `rgb` in each column of a PNG read back.
    Anti-aliasing blends the 1-px line with the white background, so a pixel counts when it lies
    on the segment white -> `rgb` (at least 25% of the way). The lowest row per column skips the
    legend's sample line, which sits above the curve wherever the legend is placed here."""
    import numpy as np
    from matplotlib.image import imread

    img = imread(png)[..., :3].astype(np.float64)
    away = 1.0 - img  # how far from white
    v = 1.0 - np.asarray(rgb)
    alpha = away @ v / (v @ v)
    off = np.linalg.norm(away - alpha[..., None] * v, axis=-1)
    near = (alpha > 0.25) & (off < 0.06)
    cols = [c for c in range(near.shape[1]) if near[:, c].any()]
    return cols, [float(np.nonzero(near[:, c])[0].max()) for c in cols]


def test_png_shows_the_train_curve_and_validation_points(tmp_path: Path) -> None:
    """The image read back holds the train line (matplotlib's first colour, C0) across the plot
    from left to right, falling as the loss does (image rows grow downwards), and the validation
    points (C1) at four places."""
    from matplotlib.colors import to_rgb

    out = plot_loss_curve(_run_dir(tmp_path), tmp_path / "loss.png")
    cols, rows = _line_pixels(out, to_rgb("C0"))
    assert len(cols) > 500 and max(cols) - min(cols) > 600, f"train line: {len(cols)} columns of 800"
    fifth = len(rows) // 5
    assert median(rows[-fifth:]) - median(rows[:fifth]) > 100  # loss 5.0 -> 0.25: the line falls
    assert all(b >= a - 1 for a, b in zip(rows, rows[1:]))  # and never rises, as 5 / step

    vcols, _ = _line_pixels(out, to_rgb("C1"))
    blobs = sum(1 for a, b in zip([-10, *vcols], vcols) if b - a > 3)  # runs of marker columns
    assert blobs == 5, vcols  # steps 5, 10, 15, 20 and the legend's marker


def test_png_curve_follows_rising_data(tmp_path: Path) -> None:
    """A rising loss draws a rising line: the check above is about the data, not a fixed picture."""
    from matplotlib.colors import to_rgb

    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for step in range(1, 21):
            log.log(step, {"loss": 1.0 + 0.2 * step})
    out = plot_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    cols, rows = _line_pixels(out, to_rgb("C0"))
    assert len(cols) > 500
    fifth = len(rows) // 5  # medians: the legend's sample line may sit beside the curve's start
    assert median(rows[:fifth]) - median(rows[-fifth:]) > 200  # the right end is higher up (smaller row)
