#!/usr/bin/env bash
# GPU readiness check (see benchmarks/gpu_bench.py): bf16 TF / SSR / official steps and the
# sampler of a VAR-d16-sized random model, eager / torch.compile / CUDA graphs, in < 5 min,
# with sar plan's predicted peak memory and FLOPs of each step beside the measured ones.
#   bash benchmarks/gpu.sh --json gpu.json       # on one GPU: one JSON, rewritten after every row
#   bash benchmarks/gpu.sh --dry-run --json x    # CPU, tiny sizes, eager and compiled (inductor)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
exec timeout "${SAR_GPU_BENCH_TIMEOUT:-295}" "$PY" benchmarks/gpu_bench.py "$@"
