#!/usr/bin/env bash
# Runs the whole test suite (tests/unit, tests/multi_rank, tests/cli); installs what it needs first.
# Arguments go to pytest, e.g. tests/unit or -m "not cli" (markers in pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh --test
exec .venv/bin/python -m pytest -q "$@"
