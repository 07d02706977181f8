"""Pieces several architectures share: seeded init, the single-hook SAE shape, unit-norm decoders.

Weight layout follows SAELens so saved files load there unchanged:
W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_out], b_dec [d_out].
"""

from __future__ import annotations

import torch
from torch import nn

from shared.errors import fail
from train_sae.dictionaries.base import IO, Dictionary, mse_per_token

__all__ = ["LinearSAE", "UnitNormDecoder", "keep_topk", "mse_per_token", "random_rows"]


def random_rows(n: int, d: int, norm: float, seed: int) -> torch.Tensor:
    """[n, d] rows pointing in uniformly random directions, each of L2 norm `norm`."""
    # offset the seed so that a dictionary never starts out equal to data drawn with the same seed
    gen = torch.Generator().manual_seed(seed + 0x5AE_1217)
    rows = torch.randn(n, d, generator=gen)
    return rows * (norm / rows.norm(dim=1, keepdim=True))


def keep_topk(values: torch.Tensor, k: int) -> torch.Tensor:
    """Zero all but the k largest entries of each row of `values` [batch, n]."""
    top, idx = values.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(values).scatter(-1, idx, top)


def check_width(d_sae: int, k: int | None = None) -> None:
    if isinstance(d_sae, bool) or not isinstance(d_sae, int) or d_sae < 1:
        fail(f"the width must be an integer >= 1 (got {d_sae!r}); pass a positive --width")
    if k is not None and k > d_sae:
        fail(f"k={k} is larger than the width {d_sae}; use k <= width")


class LinearSAE(Dictionary):
    """The single-hook SAE shape: pre-activations `(x - b_dec * apply_b_dec_to_input) @ W_enc +
    b_enc`, output `acts @ W_dec + b_dec` in the same space as x.

    Init: decoder rows random directions of norm `dec_norm`, W_enc = W_dec^T, biases zero (Gao et
    al. 2024; Anthropic April 2024 update). Sparsity mixins choose the nonlinearity and the loss.
    """

    io_kind = "sae"
    apply_b_dec_to_input: bool = True
    WEIGHTS = ("W_enc", "b_enc", "W_dec", "b_dec")
    dec_norm = 1.0  # decoder row norm at init

    def __init__(self, io: IO, d_sae: int, cfg, seed: int = 0):
        super().__init__(io, d_sae, cfg)
        W_dec = random_rows(d_sae, self.d_out, self.dec_norm, seed)  # [d_sae, d_in]
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.T.clone())  # [d_in, d_sae]
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out))

    def hidden_pre(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, d_in] -> pre-activations [batch, d_sae]."""
        return self.pre_acts(x)


class UnitNormDecoder:
    """Mixin: keep decoder rows at unit norm (Towards Monosemanticity; Gao et al. 2024).

    Before the step, the gradient component parallel to each row is removed (it would only change
    the row's norm); after the step, rows are renormalised to undo the optimizer's drift.
    """

    W_dec: nn.Parameter

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        grad = self.W_dec.grad  # [d_sae, d_out]
        if grad is None:
            return
        unit = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        grad -= (grad * unit).sum(dim=1, keepdim=True) * unit

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
