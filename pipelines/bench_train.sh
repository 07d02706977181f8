#!/usr/bin/env bash
# Training benchmarks, each side by side in one run (this machine is noisy: read the ratios).
#
# 1. pipelines.bench.topk_step (extra arguments go to it, e.g. --widths 16384 --rounds 2): one
#    TopK training step (forward, backward, Adam, decoder-norm projection), ours with the sparse
#    and the dense kernels vs SAELens' TopK step vs the bare dense step (five matmuls) vs the
#    bare sparse step (encoder product + topk + the CSR ops), at d_in 512, widths 4096, 16384,
#    65536, k 32, batch 4096 on CPU; then the L1 (relu) step: ours vs SAELens' standard vs bare
#    dense. Goals on CPU: our sparse TopK step >= 2.5x faster than SAELens' at width 16384, and
#    within 1.2x of the bare sparse step. SAELens runs from .venv-saelens (made and updated as
#    pipelines/test_saelens.sh does), so both are timed in one process.
# 2. pipelines.bench.stack with $BENCH_STACK_ARGS (skip: not run): 8 members of one shape (an
#    LR sweep) as one stacked step vs their 8 steps in turn, relu and topk (dense), d_in 512,
#    width 4096, batch 4096. Goal on CPU: stacked no slower than sequential.
# 3. pipelines.bench.train with $BENCH_TRAIN_ARGS (BENCH_TRAIN_ARGS=skip: not run): loader vs
#    numpy.fromfile, steps vs bare matmuls, an 8-member sweep in one pass vs 8 separate runs.
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=offline WANDB_SILENT=true TOKENIZERS_PARALLELISM=false
# .venv-saelens: the lines of pipelines/test_saelens.sh
PY=${PYTHON:-python3}
if [ ! -x .venv-saelens/bin/python ]; then
  "$PY" -m venv .venv-saelens
fi
.venv-saelens/bin/python -m pip install -q --upgrade pip
.venv-saelens/bin/python -m pip install -q -c constraints.txt sae-lens -e ".[dev]"
.venv-saelens/bin/python -m pipelines.bench.topk_step "$@"
if [ "${BENCH_STACK_ARGS:-}" != skip ]; then
  # shellcheck disable=SC2086  # word-split on purpose: several arguments
  .venv/bin/python -m pipelines.bench.stack ${BENCH_STACK_ARGS:-}
fi
if [ "${BENCH_TRAIN_ARGS:-}" != skip ]; then
  # shellcheck disable=SC2086  # word-split on purpose: several arguments
  .venv/bin/python -m pipelines.bench.train ${BENCH_TRAIN_ARGS:-}
fi
