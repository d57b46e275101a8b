"""Progress display: plain lines without escape codes on pipes, rich on terminals, or nothing."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from lmforge.observability.progress import ProgressBar

METRICS = {"loss": 2.5, "lr": 3e-4, "tokens_per_s": 12345.0, "mfu": 0.123}


def test_plain_lines_every_k_updates() -> None:
    out = io.StringIO()
    with ProgressBar(total=10, initial=0, mode="plain", plain_every=2, file=out) as bar:
        for step in range(1, 6):
            bar.update(step, METRICS)
    lines = out.getvalue().splitlines()
    # updates 2 and 4, then the unshown last state (step 5) on close
    assert [ln.split(" | ")[0] for ln in lines] == ["train 2/10 (20.0%)", "train 4/10 (40.0%)", "train 5/10 (50.0%)"]
    assert "loss 2.5000" in lines[0] and "lr 3.00e-04" in lines[0] and "tok/s 12.3k" in lines[0]
    assert "mfu 12.3%" in lines[0] and "elapsed 0:00:0" in lines[0] and "eta " in lines[0]
    assert "\x1b" not in out.getvalue()


def test_plain_last_step_always_printed_and_val_kept() -> None:
    out = io.StringIO()
    bar = ProgressBar(total=4, initial=2, mode="plain", plain_every=100, file=out, description="ft")
    bar.update(3, METRICS)
    bar.update(4, {"loss": 1.0})
    bar.update(4, {"val_loss": 1.25})
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("ft 4/4 (100.0%) | loss 1.0000")
    assert "val 1.2500" in lines[-1] and "loss 1.0000" in lines[-1]  # val merges, train loss stays


def test_auto_on_a_non_terminal_is_plain() -> None:
    out = io.StringIO()
    with ProgressBar(total=3, mode="auto", file=out) as bar:
        assert bar.mode == "plain"
        for step in (1, 2, 3):
            bar.update(step, METRICS)
    assert len(out.getvalue().splitlines()) == 3 and "\x1b" not in out.getvalue()


def test_auto_on_a_real_pipe_has_no_escape_codes() -> None:
    code = ("from lmforge.observability.progress import ProgressBar\n"
            "with ProgressBar(total=3, mode='auto') as bar:\n"
            "    [bar.update(s, {'loss': 1.0 / s, 'lr': 1e-3}) for s in (1, 2, 3)]\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert proc.stdout.count("\n") == 3 and "train 3/3" in proc.stdout
    assert "\x1b" not in proc.stdout and "\x1b" not in proc.stderr


def test_rich_and_none_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "160")  # rich's width for a non-terminal file (default 80)
    out = io.StringIO()
    with ProgressBar(total=10, mode="rich", file=out) as bar:
        bar.update(7, METRICS)
    assert "7/10" in out.getvalue() and "loss 2.5000 | lr 3.00e-04 | tok/s 12.3k | mfu 12.3%" in out.getvalue()
    out = io.StringIO()
    with ProgressBar(total=10, mode="none", file=out) as bar:
        bar.update(10, METRICS)
    assert out.getvalue() == ""


def test_bad_mode() -> None:
    with pytest.raises(ValueError, match="progress mode must be one of"):
        ProgressBar(total=1, mode="fancy")


def test_a_val_loss_kept_on_display_names_the_step_it_was_measured_at() -> None:
    """The main job's last lines read `train 480/480 ... val 4.9915` then `... val 4.9427`: the first
    was step 400's evaluation, shown as if it were step 480's."""
    out = io.StringIO()
    bar = ProgressBar(total=6, mode="plain", file=out)
    bar.update(2, {"loss": 3.0})
    bar.update(2, {"val_loss": 2.5})
    bar.update(4, {"loss": 2.0})
    bar.update(4, {"val_loss": 1.5})
    bar.update(6, {"loss": 1.0})
    lines = out.getvalue().splitlines()
    assert "val" not in lines[0] and "| val 2.5000 |" in lines[1]
    assert "| val 2.5000 (step 2) |" in lines[2] and "| val 1.5000 |" in lines[3]
    assert "| val 1.5000 (step 4) |" in lines[4]
