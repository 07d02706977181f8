"""The interface every SAE architecture implements; the trainer and evals see only this.

One module per architecture under `train_sae/saes/`, each registering itself in
`train_sae.saes.REGISTRY` under its `--arch` name. Shapes are in names: `x: [batch, d_in]`,
`acts: [batch, d_sae]`.

Training-time flow for one step of one member (see train_sae/member.py):

    out = sae.training_forward(x, progress)    # TrainOutput: loss + parts, acts, x_hat
    out.loss.backward()
    sae.before_optimizer_step()                # e.g. project out decoder-norm gradient
    optimizer.step()
    sae.after_optimizer_step()                 # e.g. renormalise decoder rows

Activations reaching the SAE during training are already multiplied by the store's scaling
factor `sqrt(d_in) / mean_norm`; `fold_input_scaling(scale)` rewrites the weights so that the
saved SAE takes and returns unscaled activations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class TrainProgress:
    """Where training stands, for schedules that live inside a loss (L1 warm-up, AuxK)."""

    step: int
    total_steps: int
    tokens_seen: int


@dataclass
class TrainOutput:
    loss: torch.Tensor  # scalar, what backward() is called on
    x_hat: torch.Tensor  # [batch, d_in]
    acts: torch.Tensor  # [batch, d_sae] latent activations (post nonlinearity)
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # named loss terms, detached


class SAE(nn.Module):
    """Base class: encode / decode / training loss, plus optional training-time hooks."""

    arch: str = ""
    saelens_architecture: str = ""  # the SAELens architecture it is saved as (train_sae/saving.py)
    apply_b_dec_to_input: bool = False  # whether encode subtracts b_dec from x first
    WEIGHTS: tuple[str, ...] = ()  # the inference parameters, under their SAELens names

    def __init__(self, d_in: int, d_sae: int):
        super().__init__()
        self.d_in = d_in
        self.d_sae = d_sae

    # --- inference -------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """acts [batch, d_sae] -> x_hat = acts @ W_dec + b_dec (every architecture here)."""
        return acts @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    # --- training --------------------------------------------------------------------------
    def training_forward(self, x: torch.Tensor, progress: TrainProgress) -> TrainOutput:
        raise NotImplementedError

    def before_optimizer_step(self) -> None:
        """Called after backward(), before the optimizer step."""

    def after_optimizer_step(self) -> None:
        """Called after the optimizer step."""

    # --- saving ----------------------------------------------------------------------------
    def fold_input_scaling(self, scale: float) -> None:
        """Make an SAE trained on `x * scale` act on raw `x` (and reconstruct raw `x`)."""
        raise NotImplementedError

    def saelens_cfg(self) -> dict:
        """Architecture-specific keys of the SAELens cfg.json (e.g. `k` for topk)."""
        return {}

    def saelens_state(self) -> dict[str, torch.Tensor]:
        """The inference weights under SAELens' names and shapes."""
        return {name: getattr(self, name).detach() for name in self.WEIGHTS}

    @torch.no_grad()
    def load_saelens_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of `saelens_state`."""
        for name in self.WEIGHTS:
            getattr(self, name).copy_(state[name])
