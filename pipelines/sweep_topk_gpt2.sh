#!/usr/bin/env bash
# A TopK sweep (Gao et al.; AuxK loss on dead latents as SAELens PR #370, seed 000) on GPT-2 small's
# residual stream entering block 8, trained in ONE pass over one cached store: k = 16, 32, 64, 128
# at 32x width (24576 latents), lr scaled per width (2e-4 / sqrt(width / 2^14)), batch 4096.
#
# Needs a CUDA GPU and the Hugging Face hub (gpt2, Skylion007/openwebtext), and disk for the store:
# TOKENS x 768 x 2 bytes in bfloat16 (20M tokens: 31 GB).
#
# Expected: the seeds give no GPT-2 figures. What must hold: every member's L0 equals its k
# exactly; FVU falls and loss recovered rises monotonically with k, so all four members sit on
# the Pareto frontier of pareto.png; dead fractions stay low thanks to AuxK.
set -euo pipefail
cd "$(dirname "$0")/.."
bash pipelines/setup.sh
export WANDB_MODE=${WANDB_MODE:-offline} TOKENIZERS_PARALLELISM=false

STORE=${STORE:-stores/gpt2-l8-owt}
OUT=${OUT:-runs/gpt2-topk}
TOKENS=${TOKENS:-20M}

.venv/bin/cache-acts run --model gpt2 --dataset Skylion007/openwebtext --text-column text \
  --context-size 128 --bos --hook blocks.8.hook_resid_pre --tokens "$TOKENS" \
  --batch-size 256 --dtype bfloat16 --device cuda --out "$STORE"

.venv/bin/train-sae sweep --store "$STORE" --out "$OUT" --arch topk --k 16,32,64,128 \
  --expansion 32 --batch-size 4096 --device cuda --checkpoint-every 1000 --log-every 100

# held-out tokens: the openwebtext sequences right after the cached ones (same stream)
.venv/bin/train-sae eval "$OUT" --n-tokens 500000 --batch-size 64 --device cuda
.venv/bin/train-sae report "$OUT"
echo "report: $OUT/report.md   Pareto plot: $OUT/pareto.png"
