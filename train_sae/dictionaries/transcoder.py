"""`transcoder` and `skip_transcoder`: read one hook (an MLP's input), predict another (its output)
through sparse latents (Dunefsky et al. 2024, "Transcoders find interpretable LLM feature
circuits"; the skip connection: Paulo et al. 2025, "Transcoders beat sparse autoencoders").

    pre   = x @ W_enc + b_enc                    x [batch, d_in], W_enc [d_in, d_sae]
    acts  = sparsity(pre)                        topk (default), batchtopk, relu (L1), jumprelu (L0)
    y_hat = acts @ W_dec + b_dec (+ x @ W_skip^T)   W_dec [d_sae, d_out], W_skip [d_out, d_in]
    loss  = mean_batch ||y - y_hat||^2 + the sparsity's terms

The sparsity composes with the shape: `--arch transcoder --k 32` is a TopK transcoder,
`--arch transcoder --l1 5` a ReLU + L1 one (`--sparsity` names it outright). Decoder rows are
kept at unit norm, so an L1 or L0 penalty cannot be dodged by scaling; W_skip starts at zero.
The weights are SAELens's names and shapes, and the ReLU, JumpReLU and BatchTopK (inferring as a
JumpReLU) variants are saved as SAELens's `transcoder`, `skip_transcoder`, `jumprelu_transcoder`
and `jumprelu_skip_transcoder`; TopK ones, which SAELens has no format for, in the same layout
under architecture `topk_transcoder` (ours, train_sae/training/saving.py).
"""

from __future__ import annotations

import torch
from torch import nn

from train_sae.dictionaries.base import IO, Dictionary
from train_sae.dictionaries.common import UnitNormDecoder, random_rows
from train_sae.dictionaries.sparsity import compose


class Transcoder(UnitNormDecoder, Dictionary):
    arch = "transcoder"
    io_kind = "transcoder"
    WEIGHTS = ("W_enc", "b_enc", "W_dec", "b_dec")
    # sparsity -> SAELens architecture (BatchTopK infers as a JumpReLU, as SAELens saves it)
    SAELENS = {"relu": "transcoder", "jumprelu": "jumprelu_transcoder",
               "batchtopk": "jumprelu_transcoder"}

    def __init__(self, io: IO, d_sae: int, cfg, seed: int = 0):
        super().__init__(io, d_sae, cfg)
        self.W_dec = nn.Parameter(random_rows(d_sae, self.d_out, 1.0, seed))  # [d_sae, d_out]
        # encoder directions drawn apart from the decoder's: input and output spaces differ
        self.W_enc = nn.Parameter(random_rows(d_sae, self.d_in, 1.0, seed + 1).T.contiguous())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out))

    @property
    def saelens_architecture(self) -> str:  # type: ignore[override]
        return self.SAELENS.get(self.sparsity, "topk_transcoder")  # type: ignore[attr-defined]


class SkipTranscoder(Transcoder):
    arch = "skip_transcoder"
    WEIGHTS = ("W_enc", "b_enc", "W_dec", "b_dec", "W_skip")
    SAELENS = {"relu": "skip_transcoder", "jumprelu": "jumprelu_skip_transcoder",
               "batchtopk": "jumprelu_skip_transcoder"}

    def __init__(self, io: IO, d_sae: int, cfg, seed: int = 0):
        super().__init__(io, d_sae, cfg, seed)
        self.W_skip = nn.Parameter(torch.zeros(self.d_out, self.d_in))  # [d_out, d_in]

    def decode(self, acts: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        y_hat = super().decode(acts, x)
        return y_hat if x is None else y_hat + x @ self.W_skip.T


TRANSCODERS = compose(Transcoder) + compose(SkipTranscoder)
