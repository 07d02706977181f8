"""`gated`: Gated SAE (Rajamanoharan et al. 2024a, "Improving Dictionary Learning with Gated
Sparse Autoencoders").

    x~      = x - b_dec
    pi_gate = x~ @ W_enc + b_gate                          which latents fire
    mag     = ReLU(x~ @ (W_enc * exp(r_mag)) + b_mag)       how strongly (weights tied to the gate)
    acts    = 1[pi_gate > 0] * mag
    x_hat   = acts @ W_dec + b_dec
    loss    = mean_batch ||x - x_hat||^2
              + l1_coefficient * mean_batch sum_i ReLU(pi_gate)_i
              + mean_batch ||x - (ReLU(pi_gate) @ W_dec' + b_dec')||^2   (W_dec', b_dec' frozen)

The last (auxiliary) term gives the gate path a reconstruction gradient, which the Heaviside
gate otherwise blocks; it goes through detached copies of the decoder so that only the gate path
learns from it (paper eq. 8). Decoder rows are kept at unit norm, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from train_sae.dictionaries.base import SAE, TrainOutput, TrainProgress
from train_sae.dictionaries.common import (
    UnitNormDecoder,
    check_positive,
    fold_scale_into_linear,
    mse_per_token,
    random_rows,
)


@dataclass
class GatedConfig:
    l1_coefficient: float = 5.0
    """weight of the L1 penalty on the gate pre-activations"""

    def __post_init__(self) -> None:
        check_positive("l1_coefficient", self.l1_coefficient)


class GatedSAE(UnitNormDecoder, SAE):
    arch = "gated"
    saelens_architecture = "gated"
    apply_b_dec_to_input = True
    Config = GatedConfig
    WEIGHTS = ("W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec")

    def __init__(self, d_in: int, d_sae: int, cfg: GatedConfig, seed: int = 0):
        super().__init__(d_in, d_sae)
        self.cfg = cfg
        W_dec = random_rows(d_sae, d_in, 1.0, seed)
        self.W_dec = nn.Parameter(W_dec)  # [d_sae, d_in]
        self.W_enc = nn.Parameter(W_dec.T.clone())  # [d_in, d_sae]
        self.b_gate = nn.Parameter(torch.zeros(d_sae))
        self.r_mag = nn.Parameter(torch.zeros(d_sae))
        self.b_mag = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    def gate_and_magnitude(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [batch, d_in] -> (pi_gate, magnitude), both [batch, d_sae]."""
        centred = x - self.b_dec if self.apply_b_dec_to_input else x
        pi_gate = centred @ self.W_enc + self.b_gate
        magnitude = torch.relu(centred @ (self.W_enc * self.r_mag.exp()) + self.b_mag)
        return pi_gate, magnitude

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pi_gate, magnitude = self.gate_and_magnitude(x)
        return (pi_gate > 0).to(magnitude.dtype) * magnitude

    def training_forward(self, x: torch.Tensor, progress: TrainProgress) -> TrainOutput:
        pi_gate, magnitude = self.gate_and_magnitude(x)
        acts = (pi_gate > 0).to(magnitude.dtype) * magnitude  # [batch, d_sae]
        x_hat = self.decode(acts)
        mse = mse_per_token(x, x_hat)
        gate_acts = torch.relu(pi_gate)
        l1 = gate_acts.sum(dim=-1).mean()
        aux = mse_per_token(x, gate_acts @ self.W_dec.detach() + self.b_dec.detach())
        loss = mse + self.cfg.l1_coefficient * l1 + aux
        parts = {"mse": mse.detach(), "l1": l1.detach(), "aux": aux.detach()}
        return TrainOutput(loss, x_hat, acts, parts)

    def fold_input_scaling(self, scale: float) -> None:
        fold_scale_into_linear(self, scale)  # the gate and magnitude paths both read x W_enc
