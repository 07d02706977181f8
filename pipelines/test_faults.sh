#!/usr/bin/env bash
# The fault-injection suite at many random points (tests/test_faults.py, @pytest.mark.slow): a
# full disk (tmpfs; needs root, skipped otherwise), kill -9, damaged chunks, two writers at once
# and inputs changed under --resume, in both stages. The few fast cases run with `test.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash pipelines/setup.sh
export WANDB_MODE=offline WANDB_SILENT=true TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
.venv/bin/python -m pytest -q -m slow tests/test_faults.py "$@"
