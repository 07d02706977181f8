"""`april`: the Anthropic April 2024 update recipe ("how we train SAEs"; seed 004).

    acts  = ReLU(x @ W_enc + b_enc)                  (b_dec is NOT subtracted from the input)
    x_hat = acts @ W_dec + b_dec
    loss  = mean_batch ||x - x_hat||^2 + lambda(t) * mean_batch sum_i acts_i * ||W_dec[i]||

No unit-norm constraint: the penalty weights each latent by its decoder row norm instead. Init:
decoder rows random directions of norm 0.1, W_enc = W_dec^T, biases zero. lambda(t) rises
linearly from 0 to `l1_coefficient` over the first `l1_warmup_fraction` of the steps.

The rest of the recipe belongs to the trainer, not this module: inputs scaled to mean norm
sqrt(d_in) (the loader), Adam without weight decay, gradient-norm clipping at 1, and the learning
rate decayed linearly to zero over the final 20% of training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from train_sae.dictionaries.base import TrainOutput, TrainProgress
from train_sae.dictionaries.common import LinearSAE, check_fraction, check_positive, mse_per_token


@dataclass
class AprilConfig:
    l1_coefficient: float = 5.0
    """final weight of the decoder-norm-weighted L1 penalty"""
    l1_warmup_fraction: float = 0.05
    """fraction of the steps over which the L1 weight rises linearly from 0"""

    def __post_init__(self) -> None:
        check_positive("l1_coefficient", self.l1_coefficient)
        check_fraction("l1_warmup_fraction", self.l1_warmup_fraction)


class AprilSAE(LinearSAE):
    arch = "april"
    saelens_architecture = "standard"
    apply_b_dec_to_input = False
    Config = AprilConfig

    def __init__(self, d_in: int, d_sae: int, cfg: AprilConfig, seed: int = 0):
        super().__init__(d_in, d_sae, seed, dec_norm=0.1)
        self.cfg = cfg

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.hidden_pre(x))

    def l1_coefficient_at(self, progress: TrainProgress) -> float:
        """The warmed-up L1 weight at this step (SAELens' L1Scheduler: (step+1)/warmup_steps)."""
        warmup_steps = self.cfg.l1_warmup_fraction * progress.total_steps
        if warmup_steps <= 0:
            return self.cfg.l1_coefficient
        return self.cfg.l1_coefficient * min(1.0, (progress.step + 1) / warmup_steps)

    def training_forward(self, x: torch.Tensor, progress: TrainProgress) -> TrainOutput:
        acts = self.encode(x)  # [batch, d_sae]
        x_hat = self.decode(acts)
        mse = mse_per_token(x, x_hat)
        l1 = (acts * self.W_dec.norm(dim=1)).sum(dim=-1).mean()
        coefficient = self.l1_coefficient_at(progress)
        loss = mse + coefficient * l1
        return TrainOutput(loss, x_hat, acts, {"mse": mse.detach(), "l1": l1.detach()})
