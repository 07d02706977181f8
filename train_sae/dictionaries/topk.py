"""`topk`: TopK SAE with the AuxK loss on dead latents (Gao et al. 2024, "Scaling and evaluating
sparse autoencoders"), following the choices of SAELens PR #370 (seed 000).

    pre   = (x - b_dec) @ W_enc + b_enc                         [batch, d_sae]
    acts  = the k largest of ReLU(pre) per token, others 0
    x_hat = acts @ W_dec + b_dec
    loss  = mean_batch ||x - x_hat||^2 + aux_coefficient * aux

AuxK: a latent is dead once it has not fired for `dead_tokens_threshold` tokens (10M in Gao et
al.; counted in the `tokens_since_fired` buffer, which is part of `state_dict()` and so of every
checkpoint). The top `k_aux` dead latents of ReLU(pre) reconstruct the detached residual
e = x - x_hat through the decoder, with no b_dec (it is counted once, in x_hat):

    aux = mean_batch ||e - e_hat||^2                                   (SAELens PR #370, default)
    aux = mean_batch ||e - e_hat||^2 / mean_batch ||e - mean_batch(e)||^2   (aux_normalize=True)

SAELens takes the mean over the batch and does not normalise; Gao et al. (and EleutherAI, whose
code PR #370 started from) normalise by a variance, as the second form does, which makes the
coefficient independent of the residual's scale. Like EleutherAI and SAELens, the aux term is
scaled by min(n_dead / k_aux, 1) so that a handful of dead latents are not pushed to explain the
whole residual. Decoder rows are kept at unit norm and W_enc = W_dec^T at init, as in Gao et al.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shared.errors import fail
from train_sae.dictionaries.base import TrainOutput, TrainProgress
from train_sae.dictionaries.common import LinearSAE, UnitNormDecoder, check_positive, mse_per_token


@dataclass
class TopKConfig:
    k: int = 32
    """number of latents active per token"""
    k_aux: int | None = None
    """dead latents used by the AuxK loss; None means d_in // 2 (Gao et al.)"""
    aux_coefficient: float = 1 / 32
    """weight of the AuxK loss (Gao et al.: 1/32)"""
    dead_tokens_threshold: int = 10_000_000
    """a latent that has not fired for this many tokens is dead (Gao et al.: 10M)"""
    aux_normalize: bool = False
    """divide the AuxK loss by the residual's variance (Gao et al.) instead of SAELens' plain mean"""

    def __post_init__(self) -> None:
        if int(self.k) != self.k or self.k < 1:
            fail(f"k must be an integer >= 1 (got {self.k})")
        self.k = int(self.k)
        if self.k_aux is not None:
            if int(self.k_aux) != self.k_aux or self.k_aux < 1:
                fail(f"k_aux must be an integer >= 1 (got {self.k_aux})")
            self.k_aux = int(self.k_aux)
        check_positive("aux_coefficient", self.aux_coefficient)
        if int(self.dead_tokens_threshold) != self.dead_tokens_threshold or self.dead_tokens_threshold < 1:
            fail(f"dead_tokens_threshold must be an integer >= 1 (got {self.dead_tokens_threshold})")
        self.dead_tokens_threshold = int(self.dead_tokens_threshold)
        if not isinstance(self.aux_normalize, bool):
            fail(f"aux_normalize must be true or false (got {self.aux_normalize!r})")


def keep_topk(values: torch.Tensor, k: int) -> torch.Tensor:
    """Zero all but the k largest entries of each row of `values` [batch, n]."""
    top, idx = values.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(values).scatter(-1, idx, top)


class TopKSAE(UnitNormDecoder, LinearSAE):
    arch = "topk"
    saelens_architecture = "topk"
    Config = TopKConfig

    def __init__(self, d_in: int, d_sae: int, cfg: TopKConfig, seed: int = 0):
        if cfg.k > d_sae:
            fail(f"k={cfg.k} is larger than the SAE width {d_sae}; use k <= width")
        super().__init__(d_in, d_sae, seed, dec_norm=1.0)
        self.cfg = cfg
        self.k_aux = cfg.k_aux if cfg.k_aux is not None else max(1, d_in // 2)
        # tokens since each latent last fired: [d_sae]
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.long))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return keep_topk(torch.relu(self.hidden_pre(x)), self.cfg.k)

    def select(self, pre_relu: torch.Tensor) -> torch.Tensor:
        """Training-time sparsification of ReLU(pre) [batch, d_sae]."""
        return keep_topk(pre_relu, self.cfg.k)

    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.cfg.dead_tokens_threshold  # [d_sae] bool

    def training_forward(self, x: torch.Tensor, progress: TrainProgress) -> TrainOutput:
        pre_relu = torch.relu(self.hidden_pre(x))  # [batch, d_sae]
        acts = self.select(pre_relu)
        x_hat = self.decode(acts)
        mse = mse_per_token(x, x_hat)
        dead = self.dead_mask()
        aux = self.aux_loss(x - x_hat, pre_relu, dead)
        self.record_firing(acts)
        loss = mse + self.cfg.aux_coefficient * aux
        return TrainOutput(loss, x_hat, acts, {"mse": mse.detach(), "aux": aux.detach()})

    def aux_loss(
        self, residual: torch.Tensor, pre_relu: torch.Tensor, dead: torch.Tensor
    ) -> torch.Tensor:
        """AuxK: dead latents' top-k_aux acts reconstruct the detached residual [batch, d_in]."""
        n_dead = int(dead.sum())
        if n_dead == 0:
            return residual.new_zeros(())
        k_aux = min(self.k_aux, n_dead)
        aux_acts = keep_topk(pre_relu * dead, k_aux)  # [batch, d_sae], only dead latents
        target = residual.detach()
        err = (aux_acts @ self.W_dec - target).pow(2).sum(dim=-1).mean()
        if self.cfg.aux_normalize:  # the variance of the whole batch's residual
            batch = self.batch_group
            variance = batch.mean((target - batch.mean(target)).pow(2).sum(dim=-1))
            err = err / variance.clamp_min(1e-12)
        return min(n_dead / self.k_aux, 1.0) * err

    @torch.no_grad()
    def record_firing(self, acts: torch.Tensor) -> None:
        fired = self.batch_group.any((acts > 0).any(dim=0))  # [d_sae], anywhere in the batch
        self.tokens_since_fired += self.batch_group.rows(acts.shape[0])
        self.tokens_since_fired[fired] = 0

    def saelens_cfg(self) -> dict:
        return {"k": self.cfg.k, "rescale_acts_by_decoder_norm": False}
