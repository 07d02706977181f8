#!/usr/bin/env bash
# Benchmark: caching through TransformerBridge vs HookedTransformer on the same Llama-architecture
# model, and vs the bare Hugging Face forward cut at the hooked layer, side by side in one run.
# Extra arguments go to python -m pipelines.bench.bridge (e.g. --tokens 100000 --layers 8).
set -euo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false
.venv/bin/python -m pipelines.bench.bridge "$@"
