"""Loss curve PNG from metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

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
