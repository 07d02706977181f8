#!/usr/bin/env bash
# Benchmark stage 2 side by side in one run: loader vs numpy.fromfile, a TopK and an L1 training
# step vs bare matmuls, an 8-member one-pass sweep vs 8 separate runs. Extra arguments go to
# python -m pipelines.bench.train (e.g. --device cuda --d-in 768 --width 24576 --batch-size 4096).
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=offline WANDB_SILENT=true
.venv/bin/python -m pipelines.bench.train "$@"
