#!/usr/bin/env bash
# Checks that saved SAEs load in SAELens: makes .venv-saelens (sae-lens next to this project,
# with the tested torch) and runs tests/test_saelens_interop.py there. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv-saelens/bin/python ]; then
  "$PY" -m venv .venv-saelens
fi
.venv-saelens/bin/python -m pip install -q --upgrade pip
.venv-saelens/bin/python -m pip install -q -c constraints.txt sae-lens -e ".[dev]"
echo "sae-lens $(.venv-saelens/bin/python -c 'import importlib.metadata as m; print(m.version("sae-lens"))')"
export WANDB_MODE=offline WANDB_SILENT=true TOKENIZERS_PARALLELISM=false
.venv-saelens/bin/python -m pytest -q -p no:cacheprovider tests/test_saelens_interop.py "$@"
