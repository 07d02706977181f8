#!/usr/bin/env bash
# The main command for a new user: sets up .venv, caches the embedded default (SmolLM2-135M-Instruct
# on Shakespeare's plays, middle-layer residual stream, no hub needed), trains a sweep of 3 TopK and
# 3 ReLU+L1 SAEs in ONE pass over that store, evaluates each one spliced into the model on
# held-out Shakespeare, writes the sweep report with its Pareto plot, and builds the feature
# browser of all six SAEs from the store (runs/demo/sweep/features/index.html, no server needed).
# About 4 minutes on a 2-core CPU from a fresh clone, installing included (plus the downloads on a
# machine whose pip cache is empty), plus up to 4 for the feature browser (measured 4 min 09 s on
# a busy 2-core VM); a GPU is used when there is one.
# BOS / separator positions are not cached (--drop-special), nor position 1 (--first-position 2):
# after some first tokens SmolLM2's residual there has norms of 15k-25k (median 150), and ten such
# rows in 48k would carry most of the variance and dominate FVU. Those positions still serve as
# context; the evaluation leaves them unspliced likewise.
set -euo pipefail
cd "$(dirname "$0")/.."
bash pipelines/setup.sh
export WANDB_MODE=offline WANDB_SILENT=true TOKENIZERS_PARALLELISM=false

OUT=runs/demo
mkdir -p "$OUT"
echo "== 1/5 cache activations (embedded default) -> $OUT/store"
.venv/bin/cache-acts run --out "$OUT/store" --tokens 48k --batch-size 16 --drop-special \
  --first-position 2 --overwrite

echo "== 2/5 train 6 SAEs in one pass -> $OUT/sweep"
.venv/bin/train-sae sweep --store "$OUT/store" --out "$OUT/sweep" --overwrite \
  --arch topk,relu --k 16,32,64 --l1 0.5,1,2 --expansion 4 --batch-size 256 --log-every 10

echo "== 3/5 evaluate on held-out Shakespeare (SAE spliced into the model)"
.venv/bin/train-sae eval "$OUT/sweep" --n-tokens 2048

echo "== 4/5 report"
.venv/bin/train-sae report "$OUT/sweep"

echo "== 5/5 feature browser (one pass over the store for all six SAEs)"
.venv/bin/train-sae features "$OUT/sweep"
echo
echo "report:      $OUT/sweep/report.md"
echo "Pareto plot: $OUT/sweep/pareto.png"
echo "Features:    $OUT/sweep/features/index.html"
