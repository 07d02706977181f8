#!/usr/bin/env bash
# Replicates seed 004 (the SAELens notebook replicating Anthropic's April 2024 "how we train SAEs"
# update) with the two CLIs: gelu-1l, blocks.0.hook_mlp_out, 64x width (32768 latents), L1 0.005
# scaled by decoder norm with a linear L1 warm-up over the first 5% of steps, Adam lr 5e-5
# (betas 0.9, 0.999), no LR warm-up, LR decay over the last 20%, W_enc = W_dec^T init, batch 4096,
# 20,000 steps = 81,920,000 tokens of NeelNanda/c4-tokenized-2b ("tokens" column), context 1024,
# no BOS.
#
# Needs a CUDA GPU and the Hugging Face hub (model and dataset), and disk for the store:
# 81.92M rows x 512 x 2 bytes = 84 GB in float16 (168 GB in float32; set DTYPE=float32).
#
# Expected (seed 004, after 82M tokens): CE loss score 0.914 = loss recovered against zero
# ablation ("loss rec. (zero)" in report.md; "loss_recovered_zero" in metrics.json), CE with the
# SAE 4.944, CE with the MLP output zero-ablated 9.353 (so clean CE about 4.53), MSE loss 0.189,
# L1 loss 34.4. Seed 004 trained on raw activations (normalize_activations=False), hence
# --no-normalize: without it train-sae would scale inputs by sqrt(d_in) / E||x|| (the April
# update's scaling, its default), which changes what L1 0.005 weighs. Seed 004 did not clip
# gradients, hence --grad-clip 0 (the april default here is 1.0, as Anthropic's update). Either
# way the saved SAE takes and returns raw activations.
set -euo pipefail
cd "$(dirname "$0")/.."
bash pipelines/setup.sh
export WANDB_MODE=${WANDB_MODE:-offline} TOKENIZERS_PARALLELISM=false

STORE=${STORE:-stores/gelu1l-mlp0-c4}
OUT=${OUT:-runs/april-gelu1l}
DTYPE=${DTYPE:-float16}
TOKENS=81920000

.venv/bin/cache-acts run --model gelu-1l --dataset NeelNanda/c4-tokenized-2b \
  --token-column tokens --context-size 1024 --no-bos --hook blocks.0.hook_mlp_out \
  --tokens "$TOKENS" --batch-size 32 --dtype "$DTYPE" --device cuda --out "$STORE"

.venv/bin/train-sae run --store "$STORE" --out "$OUT" --arch april --expansion 64 --l1 0.005 \
  --param l1_warmup_fraction=0.05 --lr 5e-5 --beta1 0.9 --beta2 0.999 --lr-warmup-steps 0 \
  --lr-decay-frac 0.2 --grad-clip 0 --no-normalize --batch-size 4096 --tokens "$TOKENS" \
  --device cuda --seed 42 --checkpoint-every 2000 --log-every 50

# held-out tokens: the c4 sequences right after the 80,000 cached ones (same stream)
.venv/bin/train-sae eval "$OUT" --n-tokens 1000000 --batch-size 16 --device cuda
.venv/bin/train-sae report "$OUT"
echo "report: $OUT/report.md"
