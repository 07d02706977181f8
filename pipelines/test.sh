#!/usr/bin/env bash
# Sets up .venv and runs the fast test suite (the slow, heavy checks: pipelines/test_slow.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash pipelines/setup.sh
export WANDB_MODE=offline WANDB_SILENT=true TOKENIZERS_PARALLELISM=false
.venv/bin/python -m ruff check .
.venv/bin/python -m pytest -q "$@"
