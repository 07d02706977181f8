"""The sparsities a dictionary can have, as mixins over a shape (`LinearSAE`, `Crosscoder`,
`Transcoder`, `CrossLayerTranscoder`): each sets the activation, adds its loss terms and its
state, and names its hyperparameters in a Config fragment. `class TopKSAE(TopK, UnitNormDecoder,
LinearSAE)` is a TopK SAE; `TopK` over `Transcoder` a TopK transcoder.

- `ReluL1`: acts = ReLU(pre); penalty "l1" = mean_batch sum_i acts_i * w_i, with w_i = 1 or the
  latent's decoder norms summed over the output hooks (`penalty_by_decoder_norm`).
- `TopK`: the k largest of ReLU(pre) per token (Gao et al. 2024), with the AuxK loss on dead
  latents ("aux", see `TopK.aux_loss`).
- `BatchTopK`: the k x batch largest over the whole batch, a learned inference threshold
  (Bussmann et al. 2024).
- `JumpReLU`: pre * H(pre - theta) with learned thresholds and an L0 penalty through
  straight-through estimators ("l0"; Rajamanoharan et al. 2024b).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from shared.errors import fail
from train_sae.dictionaries import sparse
from train_sae.dictionaries.base import StepTensors
from train_sae.dictionaries.common import check_width, keep_topk
from train_sae.dictionaries.sparse import SparseActs
from train_sae.params import HyperParams


# --- ReLU + L1 ------------------------------------------------------------------------------------
@dataclass
class ReluL1Config(HyperParams):
    l1_coefficient: float = 5.0


class ReluL1:
    """ReLU latents with an L1 penalty (Towards Monosemanticity)."""

    sparsity = "relu"

    @staticmethod
    def optim_defaults(d_sae: int, batch_size: int, total_steps: int) -> dict:
        """Adam lr 1e-3 at batch 4096, scaled by sqrt(batch / 4096); LR warm-up from 1/10 over
        min(1000, 5% of steps), again after every Anthropic resampling; clip 1 (seed 003)."""
        return {"lr": 1e-3 * math.sqrt(batch_size / 4096),
                "lr_warmup_steps": min(1000, total_steps // 20), "grad_clip": 1.0}

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    def loss_terms(self, step: StepTensors) -> dict[str, torch.Tensor]:
        terms = super().loss_terms(step)  # type: ignore[misc]
        weights = self.latent_weights()  # type: ignore[attr-defined]
        acts = step.acts if weights is None else step.acts * weights.unsqueeze(-2)
        terms["l1"] = acts.sum(dim=-1).mean(dim=-1)  # acts >= 0: their L1 norm
        return terms


# --- TopK and AuxK --------------------------------------------------------------------------------
@dataclass
class TopKConfig(HyperParams):
    k: int = 32
    k_aux: int | None = None  # None: d_out // 2 (Gao et al.)
    aux_coefficient: float = 1 / 32
    dead_tokens_threshold: int = 10_000_000
    aux_normalize: bool = False


class TopK:
    """The k largest of ReLU(pre) per token, plus AuxK (Gao et al. 2024, "Scaling and evaluating
    sparse autoencoders"; the choices of SAELens PR #370).

    AuxK: a latent is dead once it has not fired for `dead_tokens_threshold` tokens (10M in Gao
    et al.; counted in the `tokens_since_fired` buffer, which is part of `state_dict()` and so of
    every checkpoint). The top `k_aux` dead latents of ReLU(pre) predict the detached residual
    e = target - y_hat through the decoder, with no b_dec (it is counted once, in y_hat):

        aux = mean_batch ||e - e_hat||^2                                 (SAELens PR #370)
        aux = mean_batch ||e - e_hat||^2 / mean_batch ||e - mean(e)||^2  (aux_normalize=True)

    SAELens takes the mean over the batch and does not normalise; Gao et al. (and EleutherAI)
    normalise by a variance, which makes the coefficient independent of the residual's scale.
    Like EleutherAI and SAELens, the term is scaled by min(n_dead / k_aux, 1) so that a handful
    of dead latents are not pushed to explain the whole residual.
    """

    sparsity = "topk"
    has_sparse_step = True
    cfg: TopKConfig

    @staticmethod
    def optim_defaults(d_sae: int, batch_size: int, total_steps: int) -> dict:
        """lr 2e-4 / sqrt(width / 2^14) (Gao et al. 2024, sec. 2.1 scaling), no decay."""
        return {"lr": 2e-4 / math.sqrt(d_sae / 2**14)}

    topk_groups: int = 1  # k is per group of d_sae / topk_groups latents (a CLT's layers)

    def __init__(self, io, d_sae: int, cfg: TopKConfig, seed: int = 0):
        super().__init__(io, d_sae, cfg, seed)  # type: ignore[call-arg]
        check_width(d_sae // self.topk_groups, cfg.k)
        self.k_aux = cfg.k_aux if cfg.k_aux is not None else max(1, self.d_out // 2)
        # tokens since each latent last fired: [d_sae]
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.long))

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return self.topk_relu(pre)

    def train_activation(self, pre: torch.Tensor) -> torch.Tensor:
        return self.topk_relu(pre)

    def topk_relu(self, pre: torch.Tensor) -> torch.Tensor:
        """`select(ReLU(pre))` without a ReLU pass over [batch, d_sae]: ReLU is monotone, so the
        k largest of ReLU(pre) are ReLU of the k largest of pre (the same values; only which of
        several zeros is "kept" may differ)."""
        groups = pre.reshape(*pre.shape[:-1], self.topk_groups, -1)  # [..., groups, width]
        k = self.cfg.k
        if isinstance(k, torch.Tensor):  # stacked members' own k [M]: the k_m largest of k_max
            top = groups.topk(int(k.max()), dim=-1, sorted=True)
            rank = torch.arange(top.values.shape[-1], device=pre.device)
            keep = rank < k.reshape(-1, *[1] * (groups.dim() - 1))  # [M, 1, .., k_max]
            values = torch.relu(top.values) * keep
        else:
            top = groups.topk(k, dim=-1, sorted=False)
            values = torch.relu(top.values)
        kept = torch.zeros_like(groups).scatter(-1, top.indices, values)
        return kept.reshape(pre.shape)

    def select(self, pre_relu: torch.Tensor) -> torch.Tensor:
        """Sparsification of ReLU(pre) [batch, d_sae]: the k largest of each group."""
        return self.topk_relu(pre_relu)  # ReLU of non-negative values changes nothing

    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.cfg.dead_tokens_threshold  # [d_sae] bool

    # --- the sparse step (train_sae/dictionaries/sparse.py) -----------------------------------
    def sparse_pattern(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(crow, cols) of the latents this batch keeps, from the pre-activations."""
        return sparse.topk_pattern(pre, self.cfg.k, self.topk_groups)

    def sparse_step(self, x: torch.Tensor, target: torch.Tensor) -> StepTensors:
        x_enc = self.encoder_input(x)  # type: ignore[attr-defined]
        with torch.no_grad():  # the one dense product; no [batch, d_sae] graph is kept
            W_enc, b_enc = self.W_enc, self.b_enc  # type: ignore[attr-defined]
            if torch.is_autocast_enabled(x.device.type):  # --precision: its own dtype
                pre = torch.addmm(b_enc, x_enc, W_enc)
            else:
                buf = sparse.scratch((x.shape[0], self.d_sae), W_enc.dtype, W_enc.device)
                pre = torch.addmm(b_enc, x_enc, W_enc, out=buf)
        crow, cols = self.sparse_pattern(pre)
        acts = sparse.gather_pre(x_enc, self.W_enc, self.b_enc, pre, crow, cols,  # type: ignore
                                 self.sparse_backend)  # type: ignore[attr-defined]
        acts = acts.with_vals(torch.relu(acts.vals))
        return StepTensors(x, target, (pre, x_enc), acts, self.decode(acts, x))  # type: ignore

    def loss_terms(self, step: StepTensors) -> dict[str, torch.Tensor]:
        terms = super().loss_terms(step)  # type: ignore[misc]
        residual = step.target - step.y_hat
        if isinstance(step.acts, SparseActs):
            terms["aux"] = self.sparse_aux_loss(residual, *step.pre)
        else:
            dead = self.dead_mask()  # ReLU(pre) only when some latent is dead
            terms["aux"] = self.aux_loss(residual, torch.relu(step.pre) if bool(dead.any())
                                         else step.pre, dead)
        return terms

    def aux_loss(self, residual: torch.Tensor, pre_relu: torch.Tensor, dead: torch.Tensor
                 ) -> torch.Tensor:
        """AuxK: dead latents' top-k_aux acts predict the detached residual [batch, d_out].
        Stacked members ([M, ...], train_sae/training/stack.py) each count their own dead
        latents; one with fewer than k_aux keeps zeros beyond them, which decode to nothing."""
        n_dead = dead.sum(dim=-1)  # [] (or [M])
        if not bool(n_dead.any()):
            return residual.new_zeros(n_dead.shape)
        k_aux = min(self.k_aux, int(n_dead.max()))
        aux_acts = keep_topk(pre_relu * dead.unsqueeze(-2), k_aux)  # only dead latents
        return self.aux_error(residual, aux_acts, n_dead)

    def sparse_aux_loss(self, residual: torch.Tensor, pre: torch.Tensor, x_enc: torch.Tensor
                        ) -> torch.Tensor:
        """AuxK of the sparse step: the same loss from the dead latents' top k_aux entries."""
        dead = self.dead_mask()
        n_dead = dead.sum()
        if int(n_dead) == 0:
            return residual.new_zeros(())
        k_aux = min(self.k_aux, int(n_dead))
        candidates = pre.masked_fill(~dead, 0).relu_()  # one [batch, d_sae] temporary
        crow, cols = sparse.topk_pattern(candidates, k_aux)
        del candidates
        aux = sparse.gather_pre(x_enc, self.W_enc, self.b_enc, pre, crow, cols,  # type: ignore
                                self.sparse_backend)  # type: ignore[attr-defined]
        aux = aux.with_vals(torch.relu(aux.vals) * dead[cols])
        return self.aux_error(residual, aux, n_dead)

    def aux_error(self, residual: torch.Tensor, aux_acts: torch.Tensor | SparseActs,
                  n_dead: torch.Tensor) -> torch.Tensor:
        target = residual.detach()
        err = (self.decode_latents(aux_acts) - target).pow(2).sum(dim=-1).mean(dim=-1)  # type: ignore
        if self.cfg.aux_normalize:  # the variance of the whole batch's residual
            batch = self.batch_group  # type: ignore[attr-defined]
            variance = batch.mean((target - batch.mean(target)).pow(2).sum(dim=-1))
            err = err / variance.clamp_min(1e-12)
        # min(n_dead / k_aux, 1), divided in float64 as the Python scalar it used to be
        return (n_dead.double() / self.k_aux).clamp(max=1.0).to(err.dtype) * err

    def after_forward(self, step: StepTensors) -> None:
        super().after_forward(step)  # type: ignore[misc]
        self.record_firing(step.acts)

    @torch.no_grad()
    def record_firing(self, acts: torch.Tensor | SparseActs) -> None:
        batch = self.batch_group  # type: ignore[attr-defined]
        fired = batch.any(sparse.fired_latents(acts))  # [d_sae], anywhere in the batch
        self.tokens_since_fired += batch.rows(acts.shape[-2])
        self.tokens_since_fired[fired] = 0

    def saelens_cfg(self) -> dict:
        return {"k": self.cfg.k, "rescale_acts_by_decoder_norm": False}


# --- BatchTopK ------------------------------------------------------------------------------------
@dataclass
class BatchTopKConfig(TopKConfig):
    threshold_ema: float = 0.01


class BatchTopK(TopK):
    """BatchTopK (Bussmann et al. 2024): training keeps the k x batch largest entries of
    ReLU(pre) over the whole batch (tokens share a budget of k on average; with data-parallel
    ranks, over every rank's share together), with TopK's dead-latent tracking and AuxK. It also
    learns a threshold: an exponential moving average (rate `threshold_ema`) of the smallest
    positive activation kept in each batch, started at the first batch's value. At inference the
    activation is a JumpReLU with that threshold, ReLU(pre) * (pre > threshold), per token and
    with no batch; that is also how it is saved (a JumpReLU with a `threshold` vector, as SAELens
    saves its own BatchTopK SAEs for inference)."""

    sparsity = "batchtopk"
    cfg: BatchTopKConfig

    def __init__(self, io, d_sae: int, cfg: BatchTopKConfig, seed: int = 0):
        super().__init__(io, d_sae, cfg, seed)
        # inference threshold on ReLU(pre); negative means "no batch seen yet" (then ReLU)
        self.register_buffer("threshold", torch.tensor(-1.0))

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre) * (pre > self.threshold)

    def train_activation(self, pre: torch.Tensor) -> torch.Tensor:
        return self.select(torch.relu(pre))

    def select(self, pre_relu: torch.Tensor) -> torch.Tensor:
        batch = self.batch_group  # type: ignore[attr-defined]
        keep = min(self.cfg.k * batch.rows(pre_relu.shape[0]), batch.rows(pre_relu.numel()))
        top = batch.top_values(pre_relu.flatten(), keep)  # [keep], over the whole batch
        # keep every entry at or above the smallest of them (the same entries, barring exact ties)
        acts = pre_relu * (pre_relu >= top.min())
        if self.training:  # type: ignore[attr-defined]
            self.update_threshold(top.detach())
        return acts

    def sparse_pattern(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre_relu = torch.relu(pre)
        batch = self.batch_group  # type: ignore[attr-defined]
        keep = min(self.cfg.k * batch.rows(pre.shape[0]), batch.rows(pre.numel()))
        top = batch.top_values(pre_relu.flatten(), keep)  # [keep], over the whole batch
        if self.training:  # type: ignore[attr-defined]
            self.update_threshold(top)
        return sparse.mask_pattern((pre_relu >= top.min()) & (pre_relu > 0))

    @torch.no_grad()
    def update_threshold(self, kept: torch.Tensor) -> None:
        kept = kept.to(self.threshold.dtype)  # bf16 / fp16 under --precision
        positive = kept[kept > 0]
        if positive.numel() == 0:
            return
        low = positive.min()
        if self.threshold < 0:
            self.threshold.copy_(low)
        else:
            self.threshold.lerp_(low, self.cfg.threshold_ema)

    def saelens_cfg(self) -> dict:
        return {}

    def saelens_state(self) -> dict[str, torch.Tensor]:
        state = super().saelens_state()  # type: ignore[misc]
        state["threshold"] = self.threshold.detach().clamp_min(0).expand(self.d_sae).clone()
        return state

    def load_saelens_state(self, state: dict[str, torch.Tensor]) -> None:
        super().load_saelens_state(state)  # type: ignore[misc]
        threshold = state["threshold"]  # [d_sae], one value repeated
        if not torch.all(threshold == threshold[0]):
            fail(f"this {self.arch} has per-latent thresholds; load it as a JumpReLU "  # type: ignore
                 "dictionary")
        with torch.no_grad():
            self.threshold.copy_(threshold[0])


# --- JumpReLU -------------------------------------------------------------------------------------
@dataclass
class JumpReLUConfig(HyperParams):
    l0_coefficient: float = 1.0
    bandwidth: float = 0.001
    init_threshold: float = 0.001


def _window(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Rectangle kernel K((pre - theta) / eps) / eps, K(u) = 1[|u| < 1/2]."""
    return ((pre - threshold).abs() < bandwidth / 2).to(pre.dtype) / bandwidth


class _JumpReLUFn(torch.autograd.Function):
    """pre * H(pre - theta); d/d theta = -(theta / eps) K((pre - theta) / eps) (paper eq. 11)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth: float):  # type: ignore[override]
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        pre, threshold = ctx.saved_tensors
        grad_pre = grad * (pre > threshold)
        grad_threshold = -(threshold * _window(pre, threshold, ctx.bandwidth) * grad).sum(0)
        return grad_pre, grad_threshold, None


class _StepFn(torch.autograd.Function):
    """H(pre - theta); d/d theta = -(1 / eps) K((pre - theta) / eps) (paper eq. 12)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth: float):  # type: ignore[override]
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        pre, threshold = ctx.saved_tensors
        grad_threshold = -(_window(pre, threshold, ctx.bandwidth) * grad).sum(0)
        return torch.zeros_like(pre), grad_threshold, None


class JumpReLU:
    """JumpReLU trained with an L0 penalty through straight-through estimators (Rajamanoharan et
    al. 2024b, "Jumping Ahead"): acts = pre * H(pre - theta), theta = exp(log_threshold) [d_sae]
    learned; l0 = mean_batch sum_i H(pre_i - theta_i) (times the latent's summed decoder norms
    if `penalty_by_decoder_norm`). H has no useful gradient, so theta gets a pseudo-derivative
    through a rectangle kernel of width `bandwidth` (paper eqs. 11-12). No b_dec subtraction
    from the input, as in the paper."""

    sparsity = "jumprelu"
    apply_b_dec_to_input = False
    cfg: JumpReLUConfig

    @staticmethod
    def optim_defaults(d_sae: int, batch_size: int, total_steps: int) -> dict:
        """lr 7e-5 (Rajamanoharan et al. 2024b), LR warm-up over min(1000, 5% of steps)."""
        return {"lr": 7e-5, "lr_warmup_steps": min(1000, total_steps // 20)}

    def __init__(self, io, d_sae: int, cfg: JumpReLUConfig, seed: int = 0):
        super().__init__(io, d_sae, cfg, seed)  # type: ignore[call-arg]
        self.log_threshold = torch.nn.Parameter(torch.full((d_sae,),
                                                           math.log(cfg.init_threshold)))

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()  # [d_sae]

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return pre * (pre > self.threshold)

    def train_activation(self, pre: torch.Tensor) -> torch.Tensor:
        return _JumpReLUFn.apply(pre, self.threshold, self.cfg.bandwidth)

    def loss_terms(self, step: StepTensors) -> dict[str, torch.Tensor]:
        terms = super().loss_terms(step)  # type: ignore[misc]
        fired = _StepFn.apply(step.pre, self.threshold, self.cfg.bandwidth)  # [batch, d_sae]
        weights = self.latent_weights()  # type: ignore[attr-defined]
        terms["l0"] = (fired if weights is None else fired * weights).sum(dim=-1).mean()
        return terms

    def saelens_state(self) -> dict[str, torch.Tensor]:
        state = super().saelens_state()  # type: ignore[misc]
        state["threshold"] = self.threshold.detach()
        return state

    def load_saelens_state(self, state: dict[str, torch.Tensor]) -> None:
        super().load_saelens_state(state)  # type: ignore[misc]
        with torch.no_grad():
            self.log_threshold.copy_(state["threshold"].log())


SPARSITY_MIXINS: dict[str, tuple[type, type]] = {
    "topk": (TopK, TopKConfig),
    "batchtopk": (BatchTopK, BatchTopKConfig),
    "relu": (ReluL1, ReluL1Config),
    "jumprelu": (JumpReLU, JumpReLUConfig),
}

# the option that picks a sparsity when `sparsity` is not given (batchtopk only by its name)
SIGNATURE = {"topk": "k", "relu": "l1_coefficient", "jumprelu": "l0_coefficient"}


def compose(shape: type) -> list[type]:
    """A shape with each sparsity: one class per SPARSITY_MIXINS entry (the first, topk, is the
    default), all registered under the shape's `arch`; each Config has the sparsity's fields,
    the shape's own (`shape.ShapeConfig`, if any) and `sparsity`, naming the variant."""
    variants = []
    for name, (mixin, config) in SPARSITY_MIXINS.items():
        bases = (config, shape.ShapeConfig) if hasattr(shape, "ShapeConfig") else (config,)
        cls_name = f"{mixin.__name__}{shape.__name__}"
        cfg = dataclasses.make_dataclass(
            f"{cls_name}Config", [("sparsity", str, dataclasses.field(default=name))],
            bases=bases)
        variants.append(type(cls_name, (mixin, shape),
                             {"Config": cfg, "__module__": shape.__module__}))
    return variants
