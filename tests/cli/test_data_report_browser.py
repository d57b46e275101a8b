"""The data report in a real browser: headless Chromium (Debian `chromium`) opens the page of a
pipeline run compared with another, logs no console error, and draws every plot (the screenshot
has drawn pixels where each plot is). Both checks are shown to fail when they should: a broken
page's errors are all caught, and the same report with blank images in place of the plots is
seen as undrawn. Chromium missing is a failure naming the install command, never a skip."""

from __future__ import annotations

import base64
import io
import itertools
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from lmforge.data.corpus import iter_kjv, iter_shakespeare
from lmforge.data.pipeline.config import parse_pipeline
from lmforge.data.pipeline.executor import run_pipeline
from lmforge.data.report import write_report
from tests.helpers.browser import drawn_fraction, view_page

pytestmark = pytest.mark.slow
PLOTS = {"plot-lengths", "plot-scores", "plot-domains", "plot-removals", "plot-drift"}
MIN_DRAWN = 0.02  # a drawn plot measured 5-20% of its area; an empty one 0


def _run(root: Path, name: str, docs) -> Path:
    src = root / f"{name}.jsonl"
    lines = [json.dumps({"text": d["text"], "domain": d["source"]}) for d in docs]
    lines.insert(3, "{not json")
    src.write_text("\n".join(lines) + "\n")
    cfg = parse_pipeline({"output_dir": f"out-{name}", "docs_per_shard": 20, "inputs": [{"path": src.name}],
                          "steps": [{"type": "normalize"},
                                    {"type": "quality", "min_words": 400, "max_top_ngram_fraction": 0.05}]},
                         root, "test")
    return run_pipeline(cfg).output.parent


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report")
    mixed = [*itertools.islice(iter_shakespeare(), 0, 600, 15), *itertools.islice(iter_kjv(), 0, 600, 15)]
    run = _run(root, "mixed", mixed)
    other = _run(root, "kjv", list(itertools.islice(iter_kjv(), 300, 1100, 20)))
    result = write_report(run, root / "report.html", compare_to=other)
    assert result.drift is not None and result.drift.verdict == "drift"
    return result.path


def test_report_opens_without_console_errors_and_every_plot_is_drawn(report: Path):
    view = view_page(report, selector="img.plot")
    assert view.errors == []
    assert set(view.boxes) == PLOTS
    for name, box in view.boxes.items():
        assert box["naturalWidth"] and box["width"] > 100 and box["height"] > 100, (name, box)
        assert drawn_fraction(view.screenshot, box) > MIN_DRAWN, name
    shot = Image.open(io.BytesIO(view.screenshot))
    assert shot.height >= max(b["y"] + b["height"] for b in view.boxes.values())  # the whole page


def test_the_pixel_check_sees_undrawn_plots(report: Path, tmp_path: Path):
    """The same page with white images of the same size instead of the plots: nothing drawn."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "white").save(buf, format="PNG")
    white = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    blank = tmp_path / "blank.html"
    blank.write_text(re.sub(r'src="data:image/png;base64,[^"]+"', f'src="{white}"', report.read_text()))
    view = view_page(blank, selector="img.plot")
    assert view.errors == [] and set(view.boxes) == PLOTS
    for name, box in view.boxes.items():
        assert drawn_fraction(view.screenshot, box) < 0.001, name


def test_console_errors_are_caught(tmp_path: Path):
    """A script error, a console.error call and an image that fails to load: each is reported."""
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"><title>b</title></head><body>'
                    '<img id="gone" src="missing.png" width="50" height="50">'
                    '<script>console.error("deliberate error"); notDefinedAnywhere();</script></body></html>')
    errors = view_page(page).errors
    assert len(errors) == 3, errors
    assert any("deliberate error" in e for e in errors)
    assert any("notDefinedAnywhere" in e for e in errors)
    assert any("missing.png" in e for e in errors)
