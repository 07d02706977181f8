"""Anthropic resampling of dead latents (Towards Monosemanticity, 2023, "Neuron Resampling").

At a scheduled step, latents that did not fire in the window before it (the trainer uses the
second half of the interval since the previous resampling) are dead. For each, an input is drawn from a pool of recent batches with probability proportional to
the square of its reconstruction loss ||x - x_hat||^2; then
    W_dec[j]    = x / ||x||                                  (unit-norm decoder row)
    W_enc[:, j] = x / ||x|| * 0.2 * mean_alive ||W_enc[:, i]||
    b_enc[j]    = 0
and Adam's moments (exp_avg, exp_avg_sq) of those rows/columns are zeroed. The trainer's LR
schedule then drops the LR to 1/10 and warms it up again (Conmy, seed 003, trick 3).
Applies to the `relu` SAE (W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in]).
"""

from __future__ import annotations

from collections import deque

import torch

from train_sae.dictionaries.base import SAE

ENCODER_NORM_FACTOR = 0.2  # Towards Monosemanticity: alive encoder norm x 0.2


class BatchPool:
    """The most recent input batches, at most `max_rows` rows in all (bounded memory)."""

    def __init__(self, max_rows: int):
        self.max_rows = max_rows
        self.batches: deque[torch.Tensor] = deque()
        self.n_rows = 0

    def add(self, x: torch.Tensor) -> None:
        """x: [batch, d_in]; drops the oldest batches beyond `max_rows`."""
        self.batches.append(x)
        self.n_rows += x.shape[0]
        while self.n_rows - self.batches[0].shape[0] >= self.max_rows:
            self.n_rows -= self.batches.popleft().shape[0]

    def rows(self) -> torch.Tensor:
        """[n_rows, d_in] (the newest `max_rows` rows)."""
        return torch.cat(list(self.batches))[-self.max_rows:]


@torch.no_grad()
def resample_dead(sae: SAE, optimizer: torch.optim.Optimizer, dead: torch.Tensor,
                  pool_x: torch.Tensor, generator: torch.Generator,
                  chunk_rows: int = 8192) -> int:
    """Reinitialise latents where `dead: [d_sae]` is True; returns how many were resampled."""
    dead_idx = dead.nonzero().flatten()
    n_dead = int(dead_idx.numel())
    if n_dead == 0:
        return 0
    # per-input reconstruction loss over the pool, in chunks (bounded memory)
    losses = torch.cat([(xb - sae(xb)).pow(2).sum(dim=-1) for xb in pool_x.split(chunk_rows)])
    probs = losses.double().pow(2).cpu()  # [n_pool], Towards Monosemanticity: p ~ loss^2
    if not (torch.isfinite(probs).all() and probs.sum() > 0):
        probs = torch.ones_like(probs)
    picks = torch.multinomial(probs, n_dead, replacement=n_dead > probs.numel(),
                              generator=generator)
    v = pool_x[picks.to(pool_x.device)]  # [n_dead, d_in]
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    W_enc, b_enc, W_dec = sae.W_enc, sae.b_enc, sae.W_dec
    alive = ~dead
    enc_norm = W_enc[:, alive].norm(dim=0).mean() if bool(alive.any()) else torch.tensor(1.0)
    W_dec[dead_idx] = v.to(W_dec.dtype)
    W_enc[:, dead_idx] = (v * (ENCODER_NORM_FACTOR * enc_norm)).T.to(W_enc.dtype)
    b_enc[dead_idx] = 0.0

    for param, index in ((W_dec, (dead_idx,)), (W_enc, (slice(None), dead_idx)),
                         (b_enc, (dead_idx,))):
        state = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][index] = 0.0
    return n_dead
