"""`relu`: ReLU SAE with an L1 penalty and unit-norm decoder rows (Towards Monosemanticity, 2023).

    acts  = ReLU((x - b_dec) @ W_enc + b_enc)        W_enc [d_in, d_sae], b_enc [d_sae]
    x_hat = acts @ W_dec + b_dec                     W_dec [d_sae, d_in], b_dec [d_in]
    loss  = mean_batch ||x - x_hat||^2 + l1_coefficient * mean_batch sum_i acts_i

Decoder rows stay unit norm (see `UnitNormDecoder`), so the L1 cannot be dodged by shrinking
acts and growing rows. W_enc, b_enc, W_dec are plain parameters, which the trainer's Anthropic
resampling of dead latents rewrites in place (Conmy's tricks 2 and 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from train_sae.dictionaries.base import TrainOutput, TrainProgress
from train_sae.dictionaries.common import LinearSAE, UnitNormDecoder, check_positive, mse_per_token


@dataclass
class ReluConfig:
    l1_coefficient: float = 5.0
    """weight of the L1 penalty on latent activations"""

    def __post_init__(self) -> None:
        check_positive("l1_coefficient", self.l1_coefficient)


class ReluSAE(UnitNormDecoder, LinearSAE):
    arch = "relu"
    saelens_architecture = "standard"
    Config = ReluConfig

    def __init__(self, d_in: int, d_sae: int, cfg: ReluConfig, seed: int = 0):
        super().__init__(d_in, d_sae, seed, dec_norm=1.0)
        self.cfg = cfg

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.hidden_pre(x))

    def training_forward(self, x: torch.Tensor, progress: TrainProgress) -> TrainOutput:
        acts = self.encode(x)  # [batch, d_sae]
        x_hat = self.decode(acts)
        mse = mse_per_token(x, x_hat)
        l1 = acts.abs().sum(dim=-1).mean()
        loss = mse + self.cfg.l1_coefficient * l1
        return TrainOutput(loss, x_hat, acts, {"mse": mse.detach(), "l1": l1.detach()})
