"""`clt`: a cross-layer transcoder (Ameisen et al. 2025, "Circuit Tracing"; Lindsey et al. 2024).

It reads L hooks (`--hook`, one per layer, in layer order: e.g. each layer's residual stream or
MLP input) and writes L others (`--out-hook`, the same count: each layer's MLP output). Each
layer l has its own n = width / L latents, which read only input l and write to outputs l..L-1:

    pre_l    = x_l @ W_enc[l] + b_enc[l]                   W_enc [L, d_in, n], b_enc [L * n]
    acts     = sparsity(pre)                               over all L * n latents together
    y_hat_t  = sum_{l <= t} acts_l @ W_dec[l, :, t] + b_dec[t]      W_dec [L, n, L, d_out]
    loss     = sum_t mean_batch ||y_t - y_hat_t||^2 + the sparsity's terms

`W_dec` is kept dense with the blocks t < l (a latent writing to an earlier layer) masked to
zero: they get no gradient and stay zero. The L1 / L0 penalties weigh each latent by its
decoder norms summed over the output layers it writes (`penalty_by_decoder_norm`, as in the CLT
papers); TopK keeps the k largest latents of each layer per token (so layer t's outputs depend on
inputs 0..t only, and a spliced CLT can run layer by layer). `--width` (or `--expansion`,
relative to the summed input widths) is the total over layers and must divide by L.

Saved in our format (train_sae/training/dictionary_saving.py) with the decoder split per source
layer as circuit-tracer lays it out: `W_dec.<l>` [n, L - l, d_out].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from shared.errors import fail
from train_sae.dictionaries.base import IO, Dictionary
from train_sae.dictionaries.common import random_rows
from train_sae.dictionaries.sparsity import compose
from train_sae.params import HyperParams


def check_layers(io: IO, d_sae: int) -> None:
    L = len(io.inputs)
    if len(io.outputs) != L:
        fail(f"a cross-layer transcoder maps each input layer to an output layer, but it has "
             f"{L} input hook(s) and {len(io.outputs)} output hook(s); give --hook and --out-hook "
             "the same number of times, in layer order")
    for role, splits in (("input", io.in_splits), ("output", io.out_splits)):
        if len(set(splits)) != 1:
            fail(f"the CLT's {role} hooks have different widths {splits}; its layers must be "
                 "alike (e.g. every layer's residual stream, every layer's MLP output)")
    if d_sae % L:
        fail(f"a CLT's width is split evenly over its {L} layers, but {d_sae} does not divide "
             f"by {L}; choose a width that is a multiple of {L}")


class CrossLayerTranscoder(Dictionary):
    arch = "clt"
    io_kind = "clt"
    penalty_by_decoder_norm = True
    linear_shape = False  # trains dense (no sparse step for the layered weights yet)

    @dataclass
    class ShapeConfig(HyperParams):
        dec_init_norm: float = 0.1  # each latent's decoder, flattened over the layers it writes

    def __init__(self, io: IO, d_sae: int, cfg, seed: int = 0):
        check_layers(io, d_sae)
        super().__init__(io, d_sae, cfg)
        L = self.n_layers = self.topk_groups = len(io.inputs)
        n = self.n_per_layer = d_sae // L
        d, e = io.in_splits[0], io.out_splits[0]
        # latent (l, i) writes output t >= l: [L, 1, L, 1]
        mask = torch.ones(L, L).triu().view(L, 1, L, 1)
        self.register_buffer("causal_mask", mask, persistent=False)
        gen = torch.Generator().manual_seed(seed + 0xC17)
        W_dec = torch.randn(L, n, L, e, generator=gen) * mask
        flat = W_dec.pow(2).sum(dim=(2, 3), keepdim=True).sqrt()
        self.W_dec = nn.Parameter(W_dec * (cfg.dec_init_norm / flat))  # [L, n, L, d_out]
        self.W_enc = nn.Parameter(  # [L, d_in, n], unit-norm encoder directions
            random_rows(L * n, d, 1.0, seed + 1).view(L, n, d).transpose(1, 2).contiguous())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(L * e))

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        L, d = self.n_layers, self.io.in_splits[0]
        pre = torch.einsum("bld,ldn->bln", x.reshape(-1, L, d), self.W_enc)
        return pre.reshape(x.shape[0], -1) + self.b_enc

    def decode_latents(self, acts: torch.Tensor) -> torch.Tensor:
        a = acts.reshape(acts.shape[0], self.n_layers, self.n_per_layer)
        y = torch.einsum("bln,lnte->bte", a, self.W_dec * self.causal_mask)
        return y.reshape(acts.shape[0], -1)

    def decoder_norms(self) -> torch.Tensor:
        """[d_sae, L]: each latent's decoder norm at every output layer (0 before its own)."""
        squares = (self.W_dec * self.causal_mask).pow(2).sum(dim=-1)  # [L, n, L]
        # clamp: sqrt has no gradient at 0 (the masked blocks)
        norms = squares.clamp_min(1e-30).sqrt() * self.causal_mask[..., 0]
        return norms.reshape(self.d_sae, self.n_layers)

    def fold_encoder(self, s_in: torch.Tensor) -> None:
        self.W_enc.mul_(s_in.view(self.n_layers, -1, 1))

    def fold_decoder(self, t_out: torch.Tensor) -> None:
        self.W_dec.div_(t_out.view(1, 1, self.n_layers, -1))

    def saelens_state(self) -> dict[str, torch.Tensor]:
        """W_enc [L, d_in, n], b_enc [L, n], W_dec.<l> [n, L - l, d_out], b_dec [L, d_out]
        (latents in layer-major order: latent l * n + i is latent i of layer l)."""
        L = self.n_layers
        state = {"W_enc": self.W_enc.detach(), "b_enc": self.b_enc.detach().view(L, -1),
                 "b_dec": self.b_dec.detach().view(L, -1)}
        for layer in range(L):
            state[f"W_dec.{layer}"] = self.W_dec.detach()[layer, :, layer:]
        return state  # a JumpReLU or BatchTopK sparsity adds "threshold" [L * n]

    @torch.no_grad()
    def load_saelens_state(self, state: dict[str, torch.Tensor]) -> None:
        L = self.n_layers
        self.W_enc.copy_(state["W_enc"])
        self.b_enc.copy_(state["b_enc"].reshape(-1))
        self.b_dec.copy_(state["b_dec"].reshape(-1))
        self.W_dec.zero_()
        for layer in range(L):
            self.W_dec[layer, :, layer:] = state[f"W_dec.{layer}"]

    def saelens_cfg(self) -> dict:
        return {"k": self.cfg.k} if hasattr(self.cfg, "k") else {}


CLTS = compose(CrossLayerTranscoder)
