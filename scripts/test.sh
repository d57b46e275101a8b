#!/usr/bin/env bash
# Runs the whole test suite (unit + multi-rank gloo + end-to-end); installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q "$@"
