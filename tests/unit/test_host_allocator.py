"""train.host_allocator: "auto" on a CPU run makes glibc keep freed blocks, so a step's large
tensors stop faulting their pages back in; "system" and GPU runs leave malloc alone."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.config import ConfigError, load_job_config
from lmforge.train.host_allocator import configure_host_allocator

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting applies to glibc only")

# A fresh process (the setting is process-wide) runs 12 "steps" that each allocate and touch five
# tensors (4 to 64 MiB, held together, as a step holds its activations) and free them, and prints
# the median minor page faults of the last 6 steps. The 64 MiB block is above glibc's largest
# dynamic mmap threshold (32 MiB), so by default every step maps it anew and faults in its 16,384
# pages; kept, the steps settle on reusing the same heap blocks.
ROUNDS = """
import resource, sys, torch
from lmforge.train.host_allocator import configure_host_allocator
print(configure_host_allocator(sys.argv[1], "cpu").mode)
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    held = [torch.empty(n).fill_(1.0) for n in (1 << 21, 1 << 22, 1 << 24, 3 << 21, 1 << 20)]
    del held
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(faults[6:])[3])
"""


def _median_faults(setting: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", ROUNDS, setting], capture_output=True, text=True, check=True,
                         timeout=120).stdout.split()
    return out[0], int(out[1])


@glibc_only
def test_kept_memory_stops_the_page_faults_of_a_reused_block() -> None:
    mode, kept = _median_faults("auto")
    assert mode == "kept"
    system_mode, system = _median_faults("system")
    assert system_mode == "system"
    pages = (1 << 26) // 4096
    assert system > pages // 2, system  # glibc's default: the 64 MiB block faulted in every step
    assert kept < pages // 100, kept  # kept: the freed blocks are reused, no page faulted again


def test_system_and_gpu_runs_leave_malloc_alone() -> None:
    assert configure_host_allocator("system", "cpu").mode == "system"
    gpu = configure_host_allocator("auto", "cuda")
    assert gpu.mode == "system" and "cuda" in gpu.reason


def test_the_setting_is_checked_with_the_config(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('[train]\nhost_allocator = "jemalloc"\n')
    with pytest.raises(ConfigError, match="host_allocator"):
        load_job_config(recipe)
    recipe.write_text('[train]\nhost_allocator = "system"\n')
    assert load_job_config(recipe).train.host_allocator == "system"
