#!/usr/bin/env bash
# Run every benchmark in bench/ against its named baseline and recorded target; print one table
# (benchmark, baseline, measured ratio, target, pass/fail) and exit non-zero if any misses.
#   bash scripts/bench.sh            # quick sizes: ~30-35 min on 2 cores (28.5-33.6 min measured, 2026-12-05/06)
#   bash scripts/bench.sh --full     # the sizes of the figures in docs/benchmarks.md
#   bash scripts/bench.sh --only ckpt_async,moe_experts [--dry-run]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" bench/run_all.py "$@"
