#!/usr/bin/env bash
# GPU readiness check (one NVIDIA GPU, a few minutes): bf16, fp16 + loss scaling, compile, FSDP2 CPU
# offload, MoE grouped matmuls, a 1B model's tokens/s and MFU; prints one table. Not part of the test
# suite (CI has no GPU). Exits 2 with one line when no CUDA GPU is present. Options: see
# `bash scripts/gpu_check.sh --help` (e.g. --only compile,moe-grouped --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
exec "$PY" scripts/gpu_check.py "$@"
