"""`jumprelu`: JumpReLU SAE trained with an L0 penalty through straight-through estimators
(Rajamanoharan et al. 2024b, "Jumping Ahead: Improving Reconstruction Fidelity with JumpReLU SAEs").

    pre   = x @ W_enc + b_enc                        (no b_dec subtraction, as in the paper)
    acts  = pre * H(pre - theta),  theta = exp(log_threshold)   [d_sae], learned
    x_hat = acts @ W_dec + b_dec
    loss  = mean_batch ||x - x_hat||^2 + l0_coefficient * mean_batch sum_i H(pre_i - theta_i)

H has no useful gradient, so theta gets a pseudo-derivative through a rectangle kernel of width
`bandwidth` (paper eqs. 11-12): d acts/d theta = -(theta/eps) K((pre - theta)/eps) and
d L0/d theta = -(1/eps) K((pre - theta)/eps), K(u) = 1[|u| < 1/2]. Decoder rows are kept at unit
norm (the paper fixes decoder norms, as the Gated SAE paper does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from train_sae.dictionaries.base import TrainOutput, TrainProgress
from train_sae.dictionaries.common import LinearSAE, UnitNormDecoder, check_positive, mse_per_token


@dataclass
class JumpReLUConfig:
    l0_coefficient: float = 1.0
    """weight of the (straight-through) L0 penalty"""
    bandwidth: float = 0.001
    """width eps of the rectangle kernel of the threshold's pseudo-derivative"""
    init_threshold: float = 0.001
    """initial threshold theta of every latent"""

    def __post_init__(self) -> None:
        check_positive("l0_coefficient", self.l0_coefficient)
        check_positive("bandwidth", self.bandwidth, allow_zero=False)
        check_positive("init_threshold", self.init_threshold, allow_zero=False)


def _window(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Rectangle kernel K((pre - theta) / eps) / eps."""
    return ((pre - threshold).abs() < bandwidth / 2).to(pre.dtype) / bandwidth


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, threshold, bandwidth: float):  # type: ignore[override]
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        pre, threshold = ctx.saved_tensors
        grad_pre = grad * (pre > threshold)
        grad_threshold = -(threshold * _window(pre, threshold, ctx.bandwidth) * grad).sum(0)
        return grad_pre, grad_threshold, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, threshold, bandwidth: float):  # type: ignore[override]
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        pre, threshold = ctx.saved_tensors
        grad_threshold = -(_window(pre, threshold, ctx.bandwidth) * grad).sum(0)
        return torch.zeros_like(pre), grad_threshold, None


class JumpReLUSAE(UnitNormDecoder, LinearSAE):
    arch = "jumprelu"
    saelens_architecture = "jumprelu"
    apply_b_dec_to_input = False
    Config = JumpReLUConfig

    def __init__(self, d_in: int, d_sae: int, cfg: JumpReLUConfig, seed: int = 0):
        super().__init__(d_in, d_sae, seed, dec_norm=1.0)
        self.cfg = cfg
        self.log_threshold = torch.nn.Parameter(torch.full((d_sae,), math.log(cfg.init_threshold)))

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()  # [d_sae]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.hidden_pre(x)
        return pre * (pre > self.threshold)

    def training_forward(self, x: torch.Tensor, progress: TrainProgress) -> TrainOutput:
        pre = self.hidden_pre(x)  # [batch, d_sae]
        threshold = self.threshold
        acts = _JumpReLU.apply(pre, threshold, self.cfg.bandwidth)
        x_hat = self.decode(acts)
        mse = mse_per_token(x, x_hat)
        l0 = _Step.apply(pre, threshold, self.cfg.bandwidth).sum(dim=-1).mean()
        loss = mse + self.cfg.l0_coefficient * l0
        return TrainOutput(loss, x_hat, acts, {"mse": mse.detach(), "l0": l0.detach()})

    def saelens_state(self) -> dict[str, torch.Tensor]:
        state = super().saelens_state()
        state["threshold"] = self.threshold.detach()
        return state

    def load_saelens_state(self, state: dict[str, torch.Tensor]) -> None:
        super().load_saelens_state(state)
        with torch.no_grad():
            self.log_threshold.copy_(state["threshold"].log())
