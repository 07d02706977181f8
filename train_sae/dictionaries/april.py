"""`april`: the Anthropic April 2024 update recipe ("how we train SAEs"; seed 004).

    acts  = ReLU(x @ W_enc + b_enc)                  (b_dec is NOT subtracted from the input)
    x_hat = acts @ W_dec + b_dec
    loss  = mean_batch ||x - x_hat||^2 + lambda(t) * mean_batch sum_i acts_i * ||W_dec[i]||

No unit-norm constraint: the penalty weights each latent by its decoder row norm instead. Init:
decoder rows random directions of norm 0.1, W_enc = W_dec^T, biases zero. lambda(t) rises
linearly from 0 to `l1_coefficient` over the first `l1_warmup_fraction` of the steps (the
base class's one warm-up scheduler, `warmed_up`).

The rest of the recipe belongs to the trainer, not this module: inputs scaled to mean norm
sqrt(d_in) (the loader), Adam without weight decay, gradient-norm clipping at 1, and the learning
rate decayed linearly to zero over the final 20% of training.
"""

from __future__ import annotations

from dataclasses import dataclass

from train_sae.dictionaries.common import LinearSAE
from train_sae.dictionaries.sparsity import ReluL1, ReluL1Config


def april_optim(d_sae: int, batch_size: int, total_steps: int) -> dict:
    """The April update's optimizer: Adam lr 5e-5, betas (0.9, 0.999), no LR warm-up, linear LR
    decay to 0 over the last 20%, grad-norm clip 1.0 (seed 004)."""
    return {"lr": 5e-5, "lr_decay_frac": 0.2, "grad_clip": 1.0}


@dataclass
class AprilConfig(ReluL1Config):
    l1_warmup_fraction: float = 0.05


class AprilSAE(ReluL1, LinearSAE):
    arch = "april"
    saelens_architecture = "standard"
    apply_b_dec_to_input = False
    penalty_by_decoder_norm = True
    dec_norm = 0.1
    Config = AprilConfig
    optim_defaults = staticmethod(april_optim)
