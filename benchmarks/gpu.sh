#!/usr/bin/env bash
# The accelerator benchmark, one prepared script: run it from anywhere on a GPU machine
# whose python3 has jax (with CUDA), flax, optax, diffrax, equinox, optimistix, scikit-learn
# and, for the reference rows, torch. gflow runs from this checkout (no install needed).
# Prints a table; writes gpu_bench-<device>.json to $OUT if set, else benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
PYTHONUNBUFFERED=1 python3 benchmarks/gpu_bench.py "$@"
