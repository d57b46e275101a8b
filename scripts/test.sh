#!/usr/bin/env bash
# Runs the whole test suite (tests/unit, tests/multi_rank, tests/cli); installs what it needs first.
# Two pytest-xdist workers, a test file each at a time (module fixtures are built once), files with
# long cases first (tests/conftest.py orders them; xdist keeps that order): most tests wait on
# process starts, imports and sockets, so one worker leaves a core idle (docs/benchmarks.md has
# the suite's time both ways). Tests marked `timed` run alone (tests/conftest.py).
# Arguments go to pytest, e.g. tests/unit, -m "not cli" (markers in pyproject.toml), or -n 0 to run
# in this one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh --test
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder "$@"
