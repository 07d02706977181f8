"""Reconstruction and sparsity metrics for SAEs, shared by training logs and evaluation.

Shapes: `x, x_hat: [batch, d_in]`, `acts: [batch, d_sae]`. All metrics are computed in float32
(or the input's float64) and returned as Python floats by `batch_metrics`.

Definitions (the usual ones in SAELens / sparsify / Anthropic's updates):
- l0: mean number of non-zero latents per token.
- mse: mean squared error per element, mean over batch and d_in (so it does not grow with d_in).
- fvu: fraction of variance unexplained, sum ||x - x_hat||^2 / sum ||x - mean_batch(x)||^2.
- cos_sim: mean over tokens of cos(x, x_hat).
- l2_ratio: mean over tokens of ||x_hat|| / ||x||.
- dead latents: never fired in the window; dense latents: fired on more than 10% of its tokens.

Training metrics take the batch's `BatchGroup` (train_sae/dictionaries/base.py): with data-parallel ranks
each holds a share of the rows, and the metrics are those of the whole batch.
"""

from __future__ import annotations

import torch

from train_sae.dictionaries.base import WHOLE_BATCH, BatchGroup
from train_sae.dictionaries.sparse import SparseActs

DENSE_THRESHOLD = 0.1  # a latent firing on more than 10% of tokens counts as dense
_EPS = 1e-12


def fvu(x: torch.Tensor, x_hat: torch.Tensor, batch: BatchGroup = WHOLE_BATCH) -> torch.Tensor:
    """Fraction of variance unexplained over the batch (scalar tensor; 0 = perfect). NaN when
    the batch has no variance: then no reconstruction explains anything, so none is "perfect"."""
    # sparsify's FVU: residual sum of squares over total sum of squares around the batch mean
    resid = batch.sum((x - x_hat).pow(2).sum())
    total = batch.sum((x - batch.mean(x)).pow(2).sum())
    return torch.where(total > 0, resid / total.clamp_min(_EPS), torch.nan)


def mse(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Mean squared error per element (scalar tensor)."""
    return (x - x_hat).pow(2).mean()


def l0(acts: torch.Tensor | SparseActs) -> torch.Tensor:
    """Mean number of non-zero latents per token (scalar tensor)."""
    if isinstance(acts, SparseActs):
        return acts.l0()
    return (acts != 0).sum(dim=-1).to(torch.float32).mean()


def cos_sim(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the cosine similarity between input and reconstruction."""
    return torch.nn.functional.cosine_similarity(x, x_hat, dim=-1, eps=1e-8).mean()


def l2_ratio(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ||x_hat|| / ||x|| (1 = norms preserved; < 1 = shrinkage)."""
    return (x_hat.norm(dim=-1) / x.norm(dim=-1).clamp_min(_EPS)).mean()


@torch.no_grad()
def metric_tensors(x: torch.Tensor, x_hat: torch.Tensor, acts: torch.Tensor | SparseActs,
                   blocks: dict[str, int] | None = None, batch: BatchGroup = WHOLE_BATCH
                   ) -> dict[str, torch.Tensor]:
    """l0, mse, fvu, cos_sim and l2_ratio of one batch as scalar tensors (no device sync).

    blocks: for an input that concatenates several hooks (a crosscoder's), each hook's width in
    order; adds `fvu/<hook>` and `mse/<hook>` of each hook's block of columns.
    batch: who holds the batch's rows; the metrics are the whole batch's.
    """
    x, x_hat, acts = x.detach().float(), x_hat.detach().float(), acts.detach()
    means = {"l0": l0(acts), "mse": mse(x, x_hat), "cos_sim": cos_sim(x, x_hat),
             "l2_ratio": l2_ratio(x, x_hat)}  # means over rows: averaged over equal shares
    ratios = {"fvu": fvu(x, x_hat, batch)}
    if blocks:
        assert x.shape[-1] == sum(blocks.values()), (x.shape, blocks)
        widths = list(blocks.values())
        for hook, x_h, x_hat_h in zip(blocks, x.split(widths, -1), x_hat.split(widths, -1),
                                      strict=True):
            ratios[f"fvu/{hook}"] = fvu(x_h, x_hat_h, batch)
            means[f"mse/{hook}"] = mse(x_h, x_hat_h)
    out = {**batch.average(means), **ratios}
    order = ["l0", "mse", "fvu", "cos_sim", "l2_ratio"]
    order += [f"{m}/{hook}" for hook in blocks or () for m in ("fvu", "mse")]
    return {k: out[k] for k in order}


def batch_metrics(x: torch.Tensor, x_hat: torch.Tensor, acts: torch.Tensor) -> dict[str, float]:
    """l0, mse, fvu, cos_sim and l2_ratio of one batch, as floats."""
    return {k: float(v) for k, v in metric_tensors(x, x_hat, acts).items()}


def firing_counts(acts: torch.Tensor | SparseActs) -> torch.Tensor:
    """[d_sae] how many of the rows of `acts: [batch, d_sae]` each latent fired on (int64)."""
    if isinstance(acts, SparseActs):
        return acts.firing_counts()
    return (acts.detach() != 0).sum(dim=0)


class FeatureDensity:
    """Per-latent firing counts over a window of tokens (reset with `reset`).

    density()[j] = fraction of the window's tokens on which latent j was non-zero.
    """

    def __init__(self, d_sae: int, device: str | torch.device = "cpu",
                 dense_threshold: float = DENSE_THRESHOLD):
        self.d_sae = d_sae
        self.dense_threshold = dense_threshold
        self.counts = torch.zeros(d_sae, dtype=torch.int64, device=device)  # [d_sae]
        self.n_tokens = 0

    def update(self, acts: torch.Tensor) -> None:
        """Count firings in `acts: [batch, d_sae]`."""
        assert acts.shape[-1] == self.d_sae, (acts.shape, self.d_sae)
        self.add(firing_counts(acts), acts.shape[0])

    def add(self, counts: torch.Tensor, n_tokens: int) -> None:
        """Add `counts: [d_sae]` firings (`firing_counts`) over `n_tokens` tokens."""
        self.counts += counts
        self.n_tokens += n_tokens

    def reset(self) -> None:
        self.counts.zero_()
        self.n_tokens = 0

    def density(self) -> torch.Tensor:
        """[d_sae] firing frequency in [0, 1] (zeros before any update)."""
        return self.counts.to(torch.float64).div(max(self.n_tokens, 1)).float()

    def dead_mask(self) -> torch.Tensor:
        """[d_sae] True for latents that did not fire in the window."""
        return self.counts == 0

    @property
    def dead_fraction(self) -> float:
        return float(self.dead_mask().float().mean())

    @property
    def dense_fraction(self) -> float:
        return float((self.density() > self.dense_threshold).float().mean())

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        return {"counts": self.counts.clone(), "n_tokens": self.n_tokens}

    def load_state_dict(self, state: dict[str, torch.Tensor | int]) -> None:
        self.counts.copy_(state["counts"])  # type: ignore[arg-type]
        self.n_tokens = int(state["n_tokens"])
