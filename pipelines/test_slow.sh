#!/usr/bin/env bash
# The heavy checks (marked @pytest.mark.slow): real-model loading, larger end-to-end runs. The
# fault-injection suite's many random points have their own script, pipelines/test_faults.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash pipelines/setup.sh
export WANDB_MODE=offline WANDB_SILENT=true TOKENIZERS_PARALLELISM=false
.venv/bin/python -m pytest -q -m slow --ignore tests/test_faults.py "$@"
