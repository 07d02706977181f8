"""The output tokens a latent promotes and suppresses directly: its decoder direction read by the
unembedding, W_dec[i] @ W_U (the "logit weight" / direct logit attribution of a feature, as in
Anthropic's "Towards Monosemanticity" feature views and Neuronpedia's logit tables), with no
forward pass and no final LayerNorm (its scale depends on the context)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

BLOCK = 1024  # latents per [block, d_vocab] product


@dataclass
class LogitTables:
    promoted_ids: np.ndarray  # [d_sae, n] int64, largest first
    promoted: np.ndarray  # [d_sae, n] float32
    suppressed_ids: np.ndarray  # [d_sae, n] int64, most negative first
    suppressed: np.ndarray  # [d_sae, n] float32


@torch.no_grad()
def logit_tables(W_dec: torch.Tensor, W_U: torch.Tensor, n: int) -> LogitTables:
    """W_dec [d_sae, d_model], W_U [d_model, d_vocab] -> the n most promoted and most suppressed
    tokens of every latent."""
    W_U = W_U.float()
    n = min(n, W_U.shape[1])
    parts: list[tuple[torch.Tensor, ...]] = []
    for lo in range(0, W_dec.shape[0], BLOCK):
        effect = W_dec[lo:lo + BLOCK].to(W_U.device, torch.float32) @ W_U  # [block, d_vocab]
        top = effect.topk(n, dim=1)
        bottom = effect.topk(n, dim=1, largest=False)
        parts.append((top.indices, top.values, bottom.indices, bottom.values))
    cat = [torch.cat(p).cpu().numpy() for p in zip(*parts, strict=True)]
    return LogitTables(cat[0], cat[1], cat[2], cat[3])
