#!/usr/bin/env bash
# Sets up .venv and runs the fast test suite (the slow, heavy checks: pipelines/test_slow.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash pipelines/setup.sh
bash pipelines/setup_browser.sh  # Debian's headless chromium for tests/test_features_browser.py
export WANDB_MODE=offline WANDB_SILENT=true TOKENIZERS_PARALLELISM=false
.venv/bin/python -m ruff check .
.venv/bin/python -m pytest -q "$@"
# the model-loading and caching tests again on TransformerLens 4.x (its own .venv-tl4)
bash pipelines/test_tl4.sh
