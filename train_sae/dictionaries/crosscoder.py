"""Acausal crosscoders: one dictionary of latents read from and written to several hooks at once.

Recipe: Anthropic's crosscoder update and the neelnanda-io/Crosscoders replication (seed 001).
The crosscoder is a `Dictionary` whose input is the CONCATENATION of H hooks' activations, in a fixed
hook order: `x: [batch, D]` with `D = sum(splits)` and `splits = [d_1, ..., d_H]` (hooks may have
different widths). Parameters are kept flat so one matmul serves every hook:

    W_enc [D, d_sae]   rows d_1.. of hook 1, then hook 2, ...   (conceptually [H, d, d_sae])
    b_enc [d_sae]
    W_dec [d_sae, D]                                             (conceptually [d_sae, H, d])
    b_dec [D]

    acts     = ReLU(sum_h x_h W_enc[h] + b_enc) = ReLU(x @ W_enc + b_enc)
    x_hat_h  = acts @ W_dec[:, h] + b_dec[h]

When every hook has the same width, `W_enc_stacked` / `W_dec_stacked` give the [H, d, d_sae] /
[d_sae, H, d] views of seed 001's layout.

Two architectures share this module:
- `crosscoder`: ReLU + L1 where each latent's activation is weighted by the SUM over hooks of its
  per-hook decoder norms (Anthropic crosscoder loss, seed 001); the coefficient warms up linearly
  over the first `l1_warmup_fraction` of training (April-update recipe, seed 004).
- `crosscoder_topk`: keep the k largest pre-activations (then ReLU), with TopK's AuxK on dead
  latents (Gao et al.; seed 001 expects TopK "would just be better").

Init (both): decoder rows are random directions whose FLATTENED [D] vector has norm
`dec_init_norm` (default 0.08); seed 001 reports that giving each hook's block norm 0.1 "went
terribly" and suggests the flattened norm instead. W_enc = W_dec^T, biases zero.

Inputs reaching the crosscoder in training are already multiplied per hook by the store's
`sqrt(d_h) / mean_norm_h` (the loader does it); `fold_input_scaling(scales)` folds those per-hook
factors into the weights so a saved crosscoder maps raw activations to raw reconstructions
(which changes per-hook decoder norms: pass the same scales to `relative_decoder_norms(...,
input_scales=)` to read them in training units).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from shared.errors import fail
from train_sae.dictionaries.april import april_optim
from train_sae.dictionaries.base import IO, Dictionary
from train_sae.dictionaries.sparsity import ReluL1, ReluL1Config, TopK, TopKConfig
from train_sae.params import HyperParams


@dataclass
class CrosscoderConfig(ReluL1Config):
    l1_coefficient: float = 2.0  # seed 001's example run uses --l1_coeff=2 on normalised inputs
    l1_warmup_fraction: float = 0.05  # April update: L1 ramps up linearly over the first 5%
    dec_init_norm: float = 0.08  # norm of each latent's flattened [D] decoder vector (seed 001)


@dataclass
class CrosscoderTopKConfig(TopKConfig):
    dec_init_norm: float = 0.08


class CrosscoderShape(Dictionary):
    """Acausal crosscoder over H hooks; input and output are the hooks' concatenation [batch, D]."""

    io_kind = "crosscoder"
    WEIGHTS = ("W_enc", "b_enc", "W_dec", "b_dec")

    def __init__(self, io: IO, d_sae: int, cfg: HyperParams, seed: int = 0):
        super().__init__(io, d_sae, cfg)
        D = self.d_in
        self.W_enc = nn.Parameter(torch.empty(D, d_sae))  # [D, d_sae]
        self.b_enc = nn.Parameter(torch.zeros(d_sae))  # [d_sae]
        self.W_dec = nn.Parameter(torch.empty(d_sae, D))  # [d_sae, D]
        self.b_dec = nn.Parameter(torch.zeros(D))  # [D]
        self._init_weights(seed)

    @property
    def splits(self) -> list[int]:
        return self.io.in_splits

    @property
    def hooks(self) -> list[str]:
        return self.io.in_hooks

    @property
    def n_hooks(self) -> int:
        return len(self.splits)

    @torch.no_grad()
    def _init_weights(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(self.d_sae, self.d_in, generator=gen)  # [d_sae, D]
        w *= self.cfg.dec_init_norm / w.norm(dim=1, keepdim=True)  # flattened row norm (seed 001)
        self.W_dec.copy_(w)
        self.W_enc.copy_(w.T)  # W_enc = W_dec^T (April update)

    # --- views --------------------------------------------------------------------------------
    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: [..., D] -> one [..., d_h] block per hook, in hook order."""
        return list(torch.split(x, self.splits, dim=-1))

    def _equal_width(self) -> int:
        if len(set(self.splits)) != 1:
            fail(f"the hooks have different d_in {self.splits}; there is no stacked [H, d, d_sae] "
                 "view, use W_enc_blocks() / W_dec_blocks() instead")
        return self.splits[0]

    @property
    def W_enc_stacked(self) -> torch.Tensor:
        """[H, d, d_sae] view of W_enc (equal hook widths only)."""
        return self.W_enc.view(self.n_hooks, self._equal_width(), self.d_sae)

    @property
    def W_dec_stacked(self) -> torch.Tensor:
        """[d_sae, H, d] view of W_dec (equal hook widths only)."""
        return self.W_dec.view(self.d_sae, self.n_hooks, self._equal_width())

    def W_enc_blocks(self) -> list[torch.Tensor]:
        """One [d_h, d_sae] encoder block per hook."""
        return list(torch.split(self.W_enc, self.splits, dim=0))

    def W_dec_blocks(self) -> list[torch.Tensor]:
        """One [d_sae, d_h] decoder block per hook."""
        return list(torch.split(self.W_dec, self.splits, dim=1))


class Crosscoder(ReluL1, CrosscoderShape):
    """ReLU + L1 weighted by the sum over hooks of each latent's per-hook decoder norms."""

    arch = "crosscoder"
    penalty_by_decoder_norm = True
    Config = CrosscoderConfig
    optim_defaults = staticmethod(april_optim)  # the April-update settings seed 001 follows


class TopKCrosscoder(TopK, CrosscoderShape):
    """Latents are the top k of ReLU(pre); loss = reconstruction + AuxK on dead latents."""

    arch = "crosscoder_topk"
    Config = CrosscoderTopKConfig
