#!/usr/bin/env bash
# Benchmark scaling side by side in one run: cache-acts and an 8-member train-sae sweep on 2
# torchrun ranks (1 thread each) vs 1 process (2 threads), with byte-identity checks; the loader
# from a local S3 server (moto) vs local disk; objects and bytes of a sharded store vs one chunk
# per object. Prints a table, also written to OUT/bench_scale.json. Extra arguments go to
# pipelines/bench_scale.py (e.g. --quick, --out runs/bench_scale, --tokens 262144, --rounds 3).
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=offline WANDB_SILENT=true TOKENIZERS_PARALLELISM=false
.venv/bin/python pipelines/bench_scale.py "$@"
