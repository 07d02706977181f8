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

import torch
from torch import nn

from train_sae.dictionaries.base import StepTensors, mse_per_token
from train_sae.dictionaries.common import LinearSAE, UnitNormDecoder
from train_sae.dictionaries.sparsity import ReluL1Config


class GatedSAE(UnitNormDecoder, LinearSAE):
    arch = "gated"
    saelens_architecture = "gated"
    apply_b_dec_to_input = True
    sparsity = "gated"
    Config = ReluL1Config
    WEIGHTS = ("W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec")

    @staticmethod
    def optim_defaults(d_sae: int, batch_size: int, total_steps: int) -> dict:
        """lr 5e-5 (Rajamanoharan et al. 2024a), LR warm-up over min(1000, 5% of steps)."""
        return {"lr": 5e-5, "lr_warmup_steps": min(1000, total_steps // 20)}

    def __init__(self, io, d_sae: int, cfg: ReluL1Config, seed: int = 0):
        super().__init__(io, d_sae, cfg, seed)
        del self.b_enc  # the gate and magnitude paths have biases of their own
        self.b_gate = nn.Parameter(torch.zeros(d_sae))
        self.r_mag = nn.Parameter(torch.zeros(d_sae))
        self.b_mag = nn.Parameter(torch.zeros(d_sae))

    def pre_acts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore
        """x [batch, d_in] -> (pi_gate, magnitude), both [batch, d_sae]."""
        centred = self.encoder_input(x)
        pi_gate = centred @ self.W_enc + self.b_gate
        magnitude = torch.relu(centred @ (self.W_enc * self.r_mag.exp()) + self.b_mag)
        return pi_gate, magnitude

    def activation(self, pre: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:  # type: ignore
        pi_gate, magnitude = pre
        return (pi_gate > 0).to(magnitude.dtype) * magnitude

    def loss_terms(self, step: StepTensors) -> dict[str, torch.Tensor]:
        terms = super().loss_terms(step)
        gate_acts = torch.relu(step.pre[0])
        terms["l1"] = gate_acts.sum(dim=-1).mean()
        terms["aux"] = mse_per_token(step.x, gate_acts @ self.W_dec.detach()
                                     + self.b_dec.detach())
        return terms
