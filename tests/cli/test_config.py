"""Config, in a real process: a bad value given to `lmforge` is one line on stderr, exit 2, no
traceback (the in-process cases are in tests/unit/test_config.py)."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers.cli import REPO


def test_real_process_exit_code_and_no_traceback() -> None:
    proc = subprocess.run([sys.executable, "-m", "lmforge.cli", "train", "--model.n_heads", "7"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "model.n_heads = 7" in proc.stderr
