"""A crash in native code inside an lmforge process (a segfault in torch, gloo or oneDNN) prints
where Python was, in every thread: a torchrun rank that died so reported only "signal SIGSEGV", and
a forked test rank nothing at all."""

from __future__ import annotations

import signal
import subprocess
import sys

from tests.helpers.cli import REPO

PROBE = """
import ctypes, sys
from lmforge.cli import main
main(sys.argv[1:])
def read_address_zero():
    ctypes.string_at(0)
read_address_zero()
"""


def test_a_segfault_after_main_names_the_python_line() -> None:
    proc = subprocess.run([sys.executable, "-c", PROBE, "train", "no-such-recipe.toml"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGSEGV, (proc.returncode, proc.stderr)
    assert "Fatal Python error: Segmentation fault" in proc.stderr, proc.stderr
    assert 'line 6 in read_address_zero' in proc.stderr, proc.stderr  # the frame that crashed
