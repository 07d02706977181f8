"""Per-latent statistics gathered in one streaming pass over a dictionary's activations.

`LatentCollector.add(acts, first_row)` takes the latents [batch, d_sae] of store rows
first_row.. and keeps, in memory fixed by the width (never by the rows read):
- the `top` largest activations of each latent and their rows (a running top-k: each batch's
  top-k is merged with the kept one, so the result is the top-k of every row seen);
- a uniform random sample of `samples` of the rows where each latent fires (bottom-k of a
  random key per (row, latent), the priority-sampling form of reservoir sampling); grouped by
  activation quantile for the pages (examples.py), as in Anthropic's feature views ("Towards Monosemanticity",
  2023: examples drawn from intervals of the activation distribution, not only the top);
- how often it fires (act > 0), the sum of its activations, and a histogram of its positive
  activations: HIST_BINS equal bins from 0 whose width is a power of two, doubled (adjacent
  bins merged) whenever a larger activation arrives, so the counts stay exact and at least
  half of the bins span the range seen.
Time per batch is linear in batch x d_sae.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

HIST_BINS = 64  # a power of two (bins are merged in pairs)


@dataclass
class LatentStats:
    """What `LatentCollector.result` returns (numpy, on the CPU). Example slots a latent did not
    fill have row -1."""

    n_rows: int  # rows read
    top_values: np.ndarray  # [top, d_sae] float32, descending per latent
    top_rows: np.ndarray  # [top, d_sae] int64
    sample_values: np.ndarray  # [samples, d_sae] float32, a uniform sample of firing rows
    sample_rows: np.ndarray  # [samples, d_sae] int64
    fire_count: np.ndarray  # [d_sae] int64
    act_sum: np.ndarray  # [d_sae] float64, sum of activations
    hist_counts: np.ndarray  # [d_sae, HIST_BINS] int64: bin j holds acts in (j w, (j+1) w]
    hist_width: np.ndarray  # [d_sae] float64 bin width w (0: never fired)

    @property
    def density(self) -> np.ndarray:
        return self.fire_count / max(self.n_rows, 1)

    @property
    def mean_when_firing(self) -> np.ndarray:
        return np.where(self.fire_count > 0, self.act_sum / np.maximum(self.fire_count, 1), 0.0)


class LatentCollector:
    def __init__(self, d_sae: int, top: int, samples: int, device: torch.device | str = "cpu",
                 seed: int = 0):
        self.d_sae, self.top, self.samples = d_sae, top, samples
        dev = torch.device(device)
        self.device = dev
        self.n_rows = 0
        neg_inf = torch.full((0, d_sae), -torch.inf, device=dev)
        self.top_values, self.top_rows = neg_inf.clone(), torch.zeros((0, d_sae), dtype=torch.long,
                                                                      device=dev)
        # samples are kept by their negated random key (largest = smallest key)
        self.sample_keys, self.sample_values = neg_inf.clone(), neg_inf.clone()
        self.sample_rows = torch.zeros((0, d_sae), dtype=torch.long, device=dev)
        self.fire_count = torch.zeros(d_sae, dtype=torch.long, device=dev)
        self.act_sum = torch.zeros(d_sae, dtype=torch.float64, device=dev)
        self.hist = torch.zeros((d_sae, HIST_BINS), dtype=torch.long, device=dev)
        self.width = torch.zeros(d_sae, dtype=torch.float64, device=dev)
        self.gen = torch.Generator(device=dev).manual_seed(seed)

    @torch.no_grad()
    def add(self, acts: torch.Tensor, first_row: int) -> None:
        """acts [batch, d_sae] of rows first_row, first_row + 1, ..."""
        acts = acts.float()
        batch = acts.shape[0]
        rows = torch.arange(first_row, first_row + batch, device=acts.device)[:, None]
        rows = rows.expand(batch, self.d_sae)
        firing = acts > 0
        fired = acts.masked_fill(~firing, -torch.inf)  # only firing rows are examples
        self.top_values, (self.top_rows,) = _merge(self.top_values, fired, self.top,
                                                   (self.top_rows, rows))
        key = torch.rand(acts.shape, generator=self.gen, device=acts.device)
        key = (-key).masked_fill_(~firing, -torch.inf)
        self.sample_keys, (self.sample_values, self.sample_rows) = _merge(
            self.sample_keys, key, self.samples, (self.sample_values, fired),
            (self.sample_rows, rows))
        self.fire_count += firing.sum(0)
        self.act_sum += acts.clamp(min=0).sum(0, dtype=torch.float64)
        self._histogram(acts, firing)
        self.n_rows += batch

    def _histogram(self, acts: torch.Tensor, firing: torch.Tensor) -> None:
        top = acts.max(0).values.double()  # [d_sae]
        self._cover(top)
        r, latent = firing.nonzero(as_tuple=True)
        values = acts[r, latent].double()
        # bin j holds (j w, (j + 1) w]; the largest value lands in the last bin at most
        bins = (torch.ceil(values / self.width[latent]) - 1).long().clamp_(0, HIST_BINS - 1)
        self.hist.view(-1).index_add_(0, latent * HIST_BINS + bins,
                                      torch.ones_like(bins))

    def _cover(self, top: torch.Tensor) -> None:
        """Widen each latent's bins (by powers of two, merging counts) until HIST_BINS of them
        reach its largest activation `top` [d_sae]."""
        fresh = (self.width == 0) & (top > 0)
        if fresh.any():  # the first firing: the smallest power-of-two width that covers it
            self.width[fresh] = torch.exp2(torch.ceil(torch.log2(top[fresh] / HIST_BINS)))
        grow = (self.width > 0) & (top > self.width * HIST_BINS)
        if not grow.any():
            return
        factor = torch.ceil(torch.log2(top[grow] / (self.width[grow] * HIST_BINS))).long()
        idx = grow.nonzero().squeeze(1)
        for e in factor.unique().tolist():
            sel = idx[factor == e]
            g = 2 ** e
            counts = self.hist[sel]  # [m, HIST_BINS]
            merged = torch.zeros_like(counts)
            if g >= HIST_BINS:
                merged[:, 0] = counts.sum(1)
            else:
                merged[:, :HIST_BINS // g] = counts.view(len(sel), HIST_BINS // g, g).sum(2)
            self.hist[sel] = merged
            self.width[sel] *= g

    def result(self) -> LatentStats:
        def rows_or_none(values: torch.Tensor, rows: torch.Tensor) -> np.ndarray:
            return torch.where(torch.isfinite(values), rows, -1).cpu().numpy()

        return LatentStats(
            n_rows=self.n_rows,
            top_values=self.top_values.cpu().numpy(),
            top_rows=rows_or_none(self.top_values, self.top_rows),
            sample_values=self.sample_values.cpu().numpy(),
            sample_rows=rows_or_none(self.sample_keys, self.sample_rows),
            fire_count=self.fire_count.cpu().numpy(),
            act_sum=self.act_sum.cpu().numpy(),
            hist_counts=self.hist.cpu().numpy(),
            hist_width=self.width.cpu().numpy(),
        )


def _merge(kept: torch.Tensor, new: torch.Tensor, k: int, *carried: tuple[torch.Tensor, ...]
           ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The k largest of kept [k', d] and new [batch, d] per column, with the rows of each
    (kept, new) pair in `carried` following them: (values [k, d], carried values)."""
    both = torch.cat([kept, new])
    values, idx = both.topk(min(k, both.shape[0]), dim=0)
    return values, tuple(torch.cat([a, b]).gather(0, idx) for a, b in carried)

