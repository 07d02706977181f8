"""Acausal crosscoders: one dictionary of latents read from and written to several hooks at once.

Recipe: Anthropic's crosscoder update and the neelnanda-io/Crosscoders replication (seed 001).
The crosscoder is an `SAE` whose input is the CONCATENATION of H hooks' activations, in a fixed
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
- `crosscoder_topk`: keep the k largest pre-activations (then ReLU), no sparsity penalty (Gao et
  al.; seed 001 expects TopK "would just be better").

Init (both): decoder rows are random directions whose FLATTENED [D] vector has norm
`dec_init_norm` (default 0.08); seed 001 reports that giving each hook's block norm 0.1 "went
terribly" and suggests the flattened norm instead. W_enc = W_dec^T, biases zero.

Inputs reaching the crosscoder in training are already multiplied per hook by the store's
`sqrt(d_h) / mean_norm_h` (the loader does it); `fold_input_scaling(scales)` folds those per-hook
factors into the weights so a saved crosscoder maps raw activations to raw reconstructions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from shared.errors import fail
from train_sae.dictionaries.base import SAE, TrainOutput, TrainProgress
from train_sae.dictionaries.common import mse_per_token
from train_sae.dictionaries.topk import keep_topk


def _check_number(name: str, value: object, *, low: float, high: float | None = None,
                  low_inclusive: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        fail(f"crosscoder {name} must be a number, got {value!r}")
    if value < low or (value == low and not low_inclusive) or (high is not None and value >= high):
        bound = f"{'>=' if low_inclusive else '>'} {low}" + (f" and < {high}" if high else "")
        fail(f"crosscoder {name} must be {bound}, got {value}; pass a value in that range")


@dataclass
class CrosscoderConfig:
    """Hyperparameters of the L1 crosscoder (arch `crosscoder`)."""

    l1_coefficient: float = 2.0  # seed 001's example run uses --l1_coeff=2 on normalised inputs
    l1_warmup_fraction: float = 0.05  # April update: L1 ramps up linearly over the first 5%
    dec_init_norm: float = 0.08  # norm of each latent's flattened [D] decoder vector (seed 001)

    def __post_init__(self) -> None:
        _check_number("l1_coefficient", self.l1_coefficient, low=0.0)
        _check_number("l1_warmup_fraction", self.l1_warmup_fraction, low=0.0, high=1.0)
        _check_number("dec_init_norm", self.dec_init_norm, low=0.0, low_inclusive=False)


@dataclass
class CrosscoderTopKConfig:
    """Hyperparameters of the TopK crosscoder (arch `crosscoder_topk`)."""

    k: int = 32  # latents kept per token
    dec_init_norm: float = 0.08  # norm of each latent's flattened [D] decoder vector (seed 001)

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            fail(f"crosscoder k must be an integer >= 1, got {self.k!r}")
        _check_number("dec_init_norm", self.dec_init_norm, low=0.0, low_inclusive=False)


class Crosscoder(SAE):
    """Acausal crosscoder over H hooks; input and output are the hooks' concatenation [batch, D]."""

    arch = "crosscoder"
    Config: type = CrosscoderConfig

    def __init__(self, splits: list[int], hooks: list[str], d_sae: int,
                 cfg: CrosscoderConfig | CrosscoderTopKConfig, seed: int = 0):
        super().__init__(sum(splits), d_sae)
        assert len(splits) == len(hooks) and all(d > 0 for d in splits), (splits, hooks)
        self.splits = list(splits)
        self.hooks = list(hooks)
        self.cfg = cfg
        D = self.d_in
        self.W_enc = nn.Parameter(torch.empty(D, d_sae))  # [D, d_sae]
        self.b_enc = nn.Parameter(torch.zeros(d_sae))  # [d_sae]
        self.W_dec = nn.Parameter(torch.empty(d_sae, D))  # [d_sae, D]
        self.b_dec = nn.Parameter(torch.zeros(D))  # [D]
        # one_hot[j, h] = 1 if column j of the concatenation belongs to hook h: [D, H]
        owner = torch.repeat_interleave(torch.arange(len(splits)), torch.tensor(splits))
        self.register_buffer("hook_one_hot", nn.functional.one_hot(owner, len(splits)).float(),
                             persistent=False)
        self._init_weights(seed)

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

    def concat_hooks(self, acts: dict[str, torch.Tensor]) -> torch.Tensor:
        """A loader batch {hook: [batch, d_h]} -> the crosscoder's input [batch, D], in hook order."""
        missing = [h for h in self.hooks if h not in acts]
        if missing:
            fail(f"the batch has no activations for hooks {missing}; cache them or drop them "
                 "from the crosscoder's hooks")
        blocks = [acts[h] for h in self.hooks]
        widths = [b.shape[-1] for b in blocks]
        if widths != self.splits:
            fail(f"hook widths {widths} do not match the crosscoder's d_in per hook {self.splits}")
        return torch.cat(blocks, dim=-1)

    def decoder_norms(self) -> torch.Tensor:
        """||W_dec[i, h]|| for every latent and hook: [d_sae, H] (differentiable)."""
        return (self.W_dec.pow(2) @ self.hook_one_hot).clamp_min(0.0).sqrt()

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

    # --- inference ----------------------------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, D] -> [batch, d_sae], sum_h x_h W_enc[h] + b_enc."""
        return x @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.pre_acts(x))

    # --- training -----------------------------------------------------------------------------
    def l1_coefficient_at(self, progress: TrainProgress) -> float:
        """Linear warm-up over the first l1_warmup_fraction of the steps (April update, seed 004)."""
        warmup_steps = self.cfg.l1_warmup_fraction * progress.total_steps
        if warmup_steps <= 0:
            return self.cfg.l1_coefficient
        return self.cfg.l1_coefficient * min(1.0, progress.step / warmup_steps)

    def sparsity_penalty(self, acts: torch.Tensor) -> torch.Tensor:
        """Mean over batch of sum_i acts_i * sum_h ||W_dec[i, h]|| (crosscoder L1, seed 001)."""
        return (acts * self.decoder_norms().sum(dim=1)).sum(dim=-1).mean()

    def training_forward(self, x: torch.Tensor, progress: TrainProgress) -> TrainOutput:
        """loss = sum over hooks and d of (x_hat - x)^2, mean over batch, + coefficient * penalty.

        `parts` add up to the loss: "mse" (the reconstruction term above) and "l1" (already
        multiplied by the warmed-up coefficient).
        """
        acts = self.encode(x)  # [batch, d_sae]
        x_hat = self.decode(acts)  # [batch, D]
        recon = mse_per_token(x, x_hat)
        l1 = self.l1_coefficient_at(progress) * self.sparsity_penalty(acts)
        parts = {"mse": recon.detach(), "l1": l1.detach()}
        return TrainOutput(loss=recon + l1, x_hat=x_hat, acts=acts, parts=parts)

    # --- saving -------------------------------------------------------------------------------
    def per_hook_scales(self, scales: list[float] | float) -> list[float]:
        """Validate per-hook scale factors (one float = the same for every hook)."""
        if isinstance(scales, (int, float)):
            scales = [float(scales)] * self.n_hooks
        scales = [float(s) for s in scales]
        if len(scales) != self.n_hooks:
            fail(f"got {len(scales)} input scales for {self.n_hooks} hooks {self.hooks}; "
                 "pass one scale per hook, in hook order")
        if not all(math.isfinite(s) and s > 0 for s in scales):
            fail(f"input scales must be finite and > 0, got {scales}")
        return scales

    @torch.no_grad()
    def fold_input_scaling(self, scales: list[float] | float) -> None:  # type: ignore[override]
        """Make a crosscoder trained on `x_h * s_h` (per hook) act on raw x and reconstruct raw x.

        acts are unchanged: (x_h s_h) W_enc[h] = x_h (s_h W_enc[h]); each hook's output block of
        W_dec and b_dec is divided by s_h. Note this changes per-hook decoder norms; pass the same
        scales to `relative_decoder_norms(..., input_scales=)` to read them in training units.
        """
        per_hook = torch.tensor(self.per_hook_scales(scales))
        col = torch.repeat_interleave(per_hook, torch.tensor(self.splits))  # [D]
        col = col.to(self.W_enc.device)
        self.W_enc.mul_(col[:, None])
        self.W_dec.div_(col[None, :])
        self.b_dec.div_(col)

    def hyperparameters(self) -> dict[str, float | int]:
        return asdict(self.cfg)


class TopKCrosscoder(Crosscoder):
    """Crosscoder whose latents are the top k pre-activations (ReLU'd); loss = reconstruction only."""

    arch = "crosscoder_topk"
    Config: type = CrosscoderTopKConfig

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return keep_topk(torch.relu(self.pre_acts(x)), self.cfg.k)

    def training_forward(self, x: torch.Tensor, progress: TrainProgress) -> TrainOutput:
        acts = self.encode(x)  # [batch, d_sae]
        x_hat = self.decode(acts)  # [batch, D]
        recon = mse_per_token(x, x_hat)
        return TrainOutput(loss=recon, x_hat=x_hat, acts=acts, parts={"mse": recon.detach()})


CROSSCODER_REGISTRY: dict[str, type[Crosscoder]] = {
    Crosscoder.arch: Crosscoder,
    TopKCrosscoder.arch: TopKCrosscoder,
}


def crosscoder_arch_params(arch: str) -> set[str]:
    """Names of the hyperparameters that apply to a crosscoder arch (for the sweep grid)."""
    return {f.name for f in fields(_arch_class(arch).Config)}


def _arch_class(arch: str) -> type[Crosscoder]:
    if arch not in CROSSCODER_REGISTRY:
        fail(f"unknown crosscoder arch {arch!r}; choose one of {', '.join(CROSSCODER_REGISTRY)}")
    return CROSSCODER_REGISTRY[arch]


def build_crosscoder(arch: str, splits: list[int], hooks: list[str], d_sae: int, params: dict,
                     seed: int) -> Crosscoder:
    """Validate everything a user can get wrong, then build a seeded crosscoder."""
    cls = _arch_class(arch)
    if not splits:
        fail("a crosscoder needs at least one hook; pass the hooks to read (e.g. two layers)")
    if len(hooks) != len(splits):
        fail(f"got {len(hooks)} hook names for {len(splits)} splits; give one d_in per hook")
    if len(set(hooks)) != len(hooks):
        fail(f"duplicate hook names {hooks}; give each hook a distinct name "
             "(e.g. prefix the model: 'base/blocks.3.hook_resid_post')")
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in splits):
        fail(f"every hook's d_in must be a positive integer, got splits {splits}")
    if isinstance(d_sae, bool) or not isinstance(d_sae, int) or d_sae < 1:
        fail(f"crosscoder width d_sae must be an integer >= 1, got {d_sae!r}")
    valid = crosscoder_arch_params(arch)
    unknown = sorted(set(params) - valid)
    if unknown:
        fail(f"{', '.join(unknown)} does not apply to arch {arch!r}; "
             f"its hyperparameters are {', '.join(sorted(valid))}")
    cfg = cls.Config(**params)
    if getattr(cfg, "k", 0) > d_sae:
        fail(f"crosscoder k={cfg.k} is larger than the width d_sae={d_sae}; lower k or widen")
    return cls(splits, hooks, d_sae, cfg, seed=seed)
