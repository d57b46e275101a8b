#!/usr/bin/env bash
# The main job on the embedded default: install, build corpus, train tokenizer, pack, train
# recipes/tiny-dense.toml on CPU (progress bar, checkpoints, metrics, loss-curve PNG), then print a
# generated sample. Extra arguments are recipe overrides, e.g. --train.steps 100.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH"
lmforge data prepare recipes/tiny-dense.toml "$@"
# A rerun continues runs/tiny-dense from its newest checkpoint (a finished run has nothing left to
# train); add --overwrite to start over (the old run is moved aside, never mixed or deleted).
lmforge train recipes/tiny-dense.toml --checkpoint.resume auto "$@"
echo "--- sample (runs/tiny-dense/loss.png has the loss curve) ---"
lmforge generate runs/tiny-dense --prompt "KING HENRY." --max-new-tokens 80 --temperature 0.8 --top-k 40
