"""`matryoshka_batchtopk`: a Matryoshka BatchTopK SAE (Bussmann et al. 2025, "Learning
Multi-Level Features with Matryoshka Sparse Autoencoders"; SAELens's `matryoshka_batchtopk`).

A BatchTopK SAE (sparsity.py) whose first m_1 < m_2 < ... < m_G = width latents must each be a
good dictionary on their own: `matryoshka_widths` = [m_1, ..., m_G] are cumulative widths, and
every prefix reconstructs x by itself,

    x_hat_g = acts[:, :m_g] @ W_dec[:m_g] + b_dec
    loss    = sum_g mean_batch ||x - x_hat_g||^2 + aux_coefficient * AuxK

with one BatchTopK selection over all latents (so the outer prefix is the plain SAE, reported as
"mse"; the inner prefixes' sum is "matryoshka"). General features settle in the first groups,
specific ones in later groups, which reduces feature absorption. Saved as SAELens saves it for
inference: a JumpReLU with the learned threshold. Default widths: a quarter, a half and all of
the width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shared.errors import fail
from train_sae.dictionaries.base import StepTensors, mse_per_token
from train_sae.dictionaries.common import LinearSAE, UnitNormDecoder
from train_sae.dictionaries.sparse import SparseActs
from train_sae.dictionaries.sparsity import BatchTopK, BatchTopKConfig


@dataclass
class MatryoshkaConfig(BatchTopKConfig):
    matryoshka_widths: tuple[int, ...] | None = None  # None: (width / 4, width / 2, width)


def nested_widths(given: tuple[int, ...] | None, d_sae: int) -> list[int]:
    """The cumulative prefix widths, checked: strictly increasing and ending at the width."""
    if given is None:
        return sorted({w for w in (d_sae // 4, d_sae // 2, d_sae) if w > 0})
    widths = list(given)
    if any(b <= a for a, b in zip(widths, widths[1:], strict=False)):
        fail(f"matryoshka_widths {widths} must increase strictly (they are cumulative widths, "
             "e.g. 1024+4096+16384)")
    if widths[-1] != d_sae:
        fail(f"matryoshka_widths {widths} must end at the width {d_sae} (the last prefix is the "
             f"whole SAE); write e.g. {'+'.join(map(str, [*widths[:-1], d_sae]))}")
    return widths


class MatryoshkaBatchTopKSAE(BatchTopK, UnitNormDecoder, LinearSAE):
    arch = "matryoshka_batchtopk"
    saelens_architecture = "jumprelu"
    Config = MatryoshkaConfig

    def __init__(self, io, d_sae: int, cfg: MatryoshkaConfig, seed: int = 0):
        widths = nested_widths(cfg.matryoshka_widths, d_sae)
        super().__init__(io, d_sae, cfg, seed)
        self.widths = widths

    def loss_terms(self, step: StepTensors) -> dict[str, torch.Tensor]:
        terms = super().loss_terms(step)
        inner = step.y_hat.new_zeros(())
        x_hat = self.b_dec
        start = 0
        acts = step.acts
        for width in self.widths[:-1]:  # the outer prefix is the whole SAE: terms["mse"]
            if isinstance(acts, SparseActs):  # the selected entries of this group's latents
                group = (acts.cols >= start) & (acts.cols < width)
                x_hat = x_hat + self.decode_latents(acts.masked(group))
            else:
                x_hat = x_hat + acts[:, start:width] @ self.W_dec[start:width]
            inner = inner + mse_per_token(step.target, x_hat)
            start = width
        terms["matryoshka"] = inner
        return terms
