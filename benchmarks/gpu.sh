#!/usr/bin/env bash
# GPU readiness check (see benchmarks/gpu_bench.py): bf16 TF / SSR / official steps and the
# sampler of a VAR-d16-sized random model, eager / torch.compile / CUDA graphs, in < 5 min.
#   bash benchmarks/gpu.sh [--json out.json]     # on one GPU
#   bash benchmarks/gpu.sh --dry-run             # CPU, tiny sizes (what the tests run)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
exec timeout "${SAR_GPU_BENCH_TIMEOUT:-295}" "$PY" benchmarks/gpu_bench.py "$@"
