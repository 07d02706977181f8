#!/usr/bin/env bash
# Benchmark stage 1: cache-acts end to end vs the bare model forward, and store reads vs
# numpy.fromfile, side by side in one run. Extra arguments go to python -m pipelines.bench.cache
# (e.g. --tokens 1000000 --batch-size 64).
set -euo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false
.venv/bin/python -m pipelines.bench.cache "$@"
