"""Pieces several architectures share: the linear encoder/decoder, seeded init, decoder norms.

Weight layout follows SAELens so saved files load there unchanged:
W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in].
"""

from __future__ import annotations

import math

import torch
from torch import nn

from shared.errors import fail
from train_sae.dictionaries.base import SAE


def random_rows(n: int, d: int, norm: float, seed: int) -> torch.Tensor:
    """[n, d] rows pointing in uniformly random directions, each of L2 norm `norm`."""
    # offset the seed so that an SAE never starts out equal to data drawn with the same seed
    gen = torch.Generator().manual_seed(seed + 0x5AE_1217)
    rows = torch.randn(n, d, generator=gen)
    return rows * (norm / rows.norm(dim=1, keepdim=True))


def mse_per_token(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Squared error summed over d_in, averaged over the batch (SAELens' MSE convention)."""
    return (x_hat - x).pow(2).sum(dim=-1).mean()


@torch.no_grad()
def fold_scale_into_linear(sae: SAE, scale: float) -> None:
    """Make an SAE with W_enc, W_dec and b_dec that was trained on x' = s x act on raw x.
    Pre-activations (s x - b) W + c = (x - b/s)(s W) + c are unchanged, so thresholds and gates
    on them stay as they are, and x_hat = x_hat' / s."""
    sae.W_enc.mul_(scale)
    sae.W_dec.div_(scale)
    sae.b_dec.div_(scale)


def check_positive(name: str, value: float, allow_zero: bool = True) -> None:
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        fail(f"{name} must be a finite number {bound} (got {value})")


def check_fraction(name: str, value: float) -> None:
    if not 0 <= value <= 1:
        fail(f"{name} must be in [0, 1] (got {value})")


class LinearSAE(SAE):
    """An SAE whose pre-activations are `(x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc`.

    Subclasses choose the nonlinearity and the loss. Init: decoder rows random directions of
    norm `dec_norm`, W_enc = W_dec^T, biases zero (Gao et al. 2024; Anthropic April 2024 update).
    """

    apply_b_dec_to_input: bool = True
    WEIGHTS = ("W_enc", "b_enc", "W_dec", "b_dec")

    def __init__(self, d_in: int, d_sae: int, seed: int, dec_norm: float = 1.0):
        super().__init__(d_in, d_sae)
        W_dec = random_rows(d_sae, d_in, dec_norm, seed)  # [d_sae, d_in]
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.T.clone())  # [d_in, d_sae]
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    def hidden_pre(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, d_in] -> pre-activations [batch, d_sae]."""
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def fold_input_scaling(self, scale: float) -> None:
        fold_scale_into_linear(self, scale)


class UnitNormDecoder:
    """Mixin: keep decoder rows at unit norm (Towards Monosemanticity; Gao et al. 2024).

    Before the step, the gradient component parallel to each row is removed (it would only change
    the row's norm); after the step, rows are renormalised to undo the optimizer's drift.
    """

    W_dec: nn.Parameter

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        grad = self.W_dec.grad  # [d_sae, d_in]
        if grad is None:
            return
        unit = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        grad -= (grad * unit).sum(dim=1, keepdim=True) * unit

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
