"""The interface every dictionary implements (SAEs, crosscoders, transcoders, CLTs); the trainer,
saving and evals see only this.

A dictionary maps input hooks to output hooks through latents (`IO`): `x: [batch, d_in]` is its
input hooks' activations concatenated in order, `acts: [batch, d_sae]` its latents, `y_hat:
[batch, d_out]` its prediction of its output hooks' activations concatenated. One module per
architecture under `train_sae/dictionaries/`, each class listed in the registry
(`train_sae/dictionaries/__init__.py`) under its `--arch` name.

Training-time flow for one step of one member (see train_sae/training/member.py):

    out = model.training_forward(x, progress, target)   # TrainOutput: loss + parts, acts, x_hat
    out.loss.backward()
    model.before_optimizer_step()             # e.g. project out decoder-norm gradient
    optimizer.step()
    model.after_optimizer_step()              # e.g. renormalise decoder rows

Activations reaching a dictionary during training are already multiplied per hook by the
store's scaling factor `sqrt(d_h) / mean_norm_h`; `fold_scaling(in_scales, out_scales)` rewrites
the weights so that the saved dictionary takes and returns unscaled activations.

Statistics over the whole batch inside a loss (AuxK's dead latents and residual variance,
BatchTopK's budget) go through `model.batch_group` (a `BatchGroup`): one process holding every
row by default, or data-parallel ranks each holding an equal share (`ShardedBatch`), so that a
share computes what the whole batch would.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from shared.distributed import World
from shared.errors import fail
from train_sae.dictionaries import sparse
from train_sae.dictionaries.sparse import SparseActs


@dataclass
class TrainProgress:
    """Where training stands, for schedules that live inside a loss (L1 warm-up, AuxK)."""

    step: int
    total_steps: int
    tokens_seen: int


@dataclass
class TrainOutput:
    loss: torch.Tensor  # scalar, what backward() is called on
    x_hat: torch.Tensor  # [batch, d_out] the prediction
    acts: torch.Tensor | SparseActs  # [batch, d_sae] latent activations (post nonlinearity)
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # named loss terms, detached


class BatchGroup:
    """The processes that hold one training batch between them; this base class is one process
    holding every row, and each method is the plain one-process expression. Shapes: `t: [rows,
    ...]` is this process's rows."""

    size = 1  # processes sharing each batch

    def rows(self, n: int) -> int:
        """Rows in the whole batch, given this process's `n`."""
        return n

    def whole(self, t: torch.Tensor) -> torch.Tensor:
        """The whole batch [rows of every process, ...] from this process's rows `t`."""
        return t

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean over the rows (dim 0) of the whole batch: [rows, ...] -> [...]."""
        return t.mean(dim=0)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over the processes (firing counts, sums of squares)."""
        return t

    def any(self, t: torch.Tensor) -> torch.Tensor:
        """A bool tensor or-ed over the processes."""
        return t

    def average(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Scalar means over this process's rows -> means over the whole batch."""
        return values

    def top_values(self, values: torch.Tensor, k: int) -> torch.Tensor:
        """The k largest of `values: [n]` taken over every process's values together: [k]."""
        return values.topk(k, sorted=False).values

    def reduce_gradients(self, params: Iterable[nn.Parameter], loss: torch.Tensor
                         ) -> torch.Tensor:
        """Make each parameter's gradient that of the whole batch's mean loss; returns that loss
        (detached)."""
        return loss


WHOLE_BATCH = BatchGroup()  # stateless: shared by every SAE trained in one process


class ShardedBatch(BatchGroup):
    """Data-parallel ranks, each holding an equal share of every batch's rows (so a mean over the
    batch is the mean of the ranks' means). The reductions are tensor collectives every rank
    runs in the same order: a member trains in step on every rank."""

    def __init__(self, world: World):
        self.world = world
        self.size = world.world_size

    def rows(self, n: int) -> int:
        return n * self.size

    def whole(self, t: torch.Tensor) -> torch.Tensor:
        return self.world.all_gather(t)  # the shares, in rank order, are the batch's rows

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        return self.world.all_reduce(t.sum(dim=0)) / self.rows(t.shape[0])

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.world.all_reduce(t.clone())

    def any(self, t: torch.Tensor) -> torch.Tensor:
        return self.world.all_reduce(t.to(torch.int32), op="max") > 0

    def average(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not values:
            return values
        stacked = torch.stack([v.detach().double() for v in values.values()])  # one collective
        means = self.world.all_reduce(stacked) / self.size
        return dict(zip(values, means, strict=True))

    def top_values(self, values: torch.Tensor, k: int) -> torch.Tensor:
        # the whole batch's top k lie among the union of every share's own top k
        mine = values.topk(min(k, values.numel()), sorted=False).values
        return self.world.all_gather(mine).topk(k, sorted=False).values

    def reduce_gradients(self, params: Iterable[nn.Parameter], loss: torch.Tensor
                         ) -> torch.Tensor:
        # the whole batch's mean loss is the mean of the equal shares' mean losses, and so is its
        # gradient: average [loss, every gradient] in one all-reduce
        grads = [p.grad for p in params if p.grad is not None]
        dtype = grads[0].dtype if grads else loss.dtype
        flat = torch.cat([loss.detach().reshape(1).to(dtype)] + [g.reshape(-1) for g in grads])
        self.world.all_reduce(flat).div_(self.size)
        offset = 1
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        return flat[0]


@dataclass(frozen=True)
class IO:
    """Which store hooks a dictionary reads and which it writes, with their widths, in order.
    An SAE writes the hook it reads; a crosscoder writes every hook it reads; a transcoder reads
    one hook and writes another; a CLT reads L hooks and writes L others."""

    inputs: tuple[tuple[str, int], ...]  # (hook, d) read, in order
    outputs: tuple[tuple[str, int], ...]  # (hook, d) written, in order

    @classmethod
    def same(cls, hooks: dict[str, int]) -> IO:
        """Read and write the same hooks (an SAE, a crosscoder)."""
        pairs = tuple(hooks.items())
        return cls(pairs, pairs)

    @classmethod
    def of(cls, inputs: dict[str, int], outputs: dict[str, int]) -> IO:
        return cls(tuple(inputs.items()), tuple(outputs.items()))

    @property
    def in_hooks(self) -> list[str]:
        return [h for h, _ in self.inputs]

    @property
    def out_hooks(self) -> list[str]:
        return [h for h, _ in self.outputs]

    @property
    def in_splits(self) -> list[int]:
        return [d for _, d in self.inputs]

    @property
    def out_splits(self) -> list[int]:
        return [d for _, d in self.outputs]

    @property
    def autoencoder(self) -> bool:
        """Whether it reconstructs its own input (an SAE or crosscoder)."""
        return self.inputs == self.outputs


@dataclass
class StepTensors:
    """One training forward pass: what every loss term may read."""

    x: torch.Tensor  # [batch, d_in] the inputs (hooks concatenated)
    target: torch.Tensor  # [batch, d_out] what the dictionary predicts (x for an autoencoder)
    pre: torch.Tensor | tuple  # pre-activations [batch, d_sae] (gated: (gate, magnitude))
    acts: torch.Tensor | SparseActs  # [batch, d_sae] latent activations
    y_hat: torch.Tensor  # [batch, d_out] the prediction


# Loss term -> (the Config field holding its weight, the Config field holding its warm-up
# fraction or None). A term whose weight field the dictionary's Config lacks has weight 1 (the
# reconstruction, Gated's auxiliary, Matryoshka's prefixes). `coefficient_at` is the one
# scheduler of these weights.
TERM_WEIGHTS: dict[str, tuple[str, str | None]] = {
    "l1": ("l1_coefficient", "l1_warmup_fraction"),
    "l0": ("l0_coefficient", None),
    "aux": ("aux_coefficient", None),
}


def warmed_up(value: float, warmup_fraction: float, progress: TrainProgress | None) -> float:
    """`value` ramped linearly from 0 over the first `warmup_fraction` of the steps, as SAELens'
    L1 scheduler does: (step + 1) / warmup_steps of it at `step` (Anthropic April update)."""
    if progress is None or warmup_fraction <= 0:
        return value
    warmup_steps = warmup_fraction * progress.total_steps
    if warmup_steps <= 0:
        return value
    return value * min(1.0, (progress.step + 1) / warmup_steps)


class Dictionary(nn.Module):
    """Base class of every dictionary: inputs [batch, d_in] (its input hooks concatenated) ->
    latents [batch, d_sae] -> outputs [batch, d_out] (its output hooks concatenated).

    It owns the training step every architecture shares (`training_forward`):

        pre    = pre_acts(x)                 encoder
        acts   = train_activation(pre)       the sparsity: ReLU, TopK, BatchTopK, JumpReLU, ...
        y_hat  = decode(acts, x)             decoder (plus a skip connection, if any)
        terms  = loss_terms(step)            {"mse": ..., "l1"/"l0"/"aux"/...: ...}
        loss   = sum of coefficient_at(term) * term

    Architectures are a shape (`LinearSAE`, `Crosscoder`, `Transcoder`, `CrossLayerTranscoder`)
    and a sparsity (mixins in sparsity.py) and override only what differs; the mixins add their
    loss terms through cooperative `super().loss_terms(step)` calls.
    """

    arch: str = ""
    Config: type  # the architecture's hyperparameters (a HyperParams dataclass)
    io_kind: str = "sae"  # which hooks it maps: "sae", "crosscoder", "transcoder" or "clt"
    saelens_architecture: str = ""  # the SAELens architecture it is saved as ("" = our format)
    apply_b_dec_to_input: bool = False  # whether encode subtracts b_dec from x first
    WEIGHTS: tuple[str, ...] = ()  # the inference parameters, under their saved names
    batch_group: BatchGroup = WHOLE_BATCH  # who holds the training batch (the trainer sets it)
    # the sparsity penalty weighs each latent by the sum over output hooks of its decoder norms
    # (Anthropic April update, crosscoders, CLTs), so it cannot be dodged by shrinking the latents
    penalty_by_decoder_norm: bool = False
    sparsity: str = ""  # its sparsity's name (several classes of one arch differ by it)
    resamples: bool = False  # whether Anthropic resampling of dead latents applies
    # the sparse training step (`sparse_step`, train_sae/dictionaries/sparse.py): the sparsity
    # has one (the TopK family), the shape is linear (W_enc [d_in, d_sae], W_dec [d_sae, d_out];
    # not a CLT), and the trainer turned it on (`sparse_kernels`, from --kernels)
    has_sparse_step: bool = False
    linear_shape: bool = True
    sparse_kernels: bool = False
    sparse_backend: str = "torch"  # whose kernels run the sparse step: torch's CSR ops or triton
    # whether members of this class may train stacked, with a leading member dimension on every
    # parameter and buffer (train_sae/training/stack.py): its dense step broadcasts over it
    stackable: bool = False
    compile_step: bool = False  # --compile: the dense forward through torch.compile
    # hyperparameters besides the loss weights that may differ within a stack (held as [M])
    stack_varying: tuple[str, ...] = ()

    @property
    def supports_sparse(self) -> bool:
        return self.has_sparse_step and self.linear_shape

    @staticmethod
    def optim_defaults(d_sae: int, batch_size: int, total_steps: int) -> dict[str, Any]:
        """Optimizer settings (train_sae/training/config.py OptimConfig) of its recipe."""
        return {"lr": 1e-4}

    def __init__(self, io: IO, d_sae: int, cfg: Any):
        super().__init__()
        self.io = io
        self.cfg = cfg
        self.d_in = sum(io.in_splits)
        self.d_out = sum(io.out_splits)
        self.d_sae = d_sae

    # --- what it reads and writes ----------------------------------------------------------
    @property
    def in_hooks(self) -> list[str]:
        return self.io.in_hooks

    @property
    def out_hooks(self) -> list[str]:
        return self.io.out_hooks

    def inputs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """A loader batch {hook: [batch, d_h]} -> the input [batch, d_in], hooks in order."""
        return _concat(batch, self.io.inputs, "input")

    def targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """A loader batch -> what it learns to predict [batch, d_out], hooks in order."""
        return _concat(batch, self.io.outputs, "output")

    def split_outputs(self, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """[..., d_out] -> {output hook: [..., d_h]}."""
        return dict(zip(self.out_hooks, torch.split(y, self.io.out_splits, dim=-1), strict=True))

    def decoder_norms(self) -> torch.Tensor:
        """||W_dec[i, h]|| of every latent i for every output hook h: [d_sae, H_out]
        (differentiable). For a decoder W_dec [d_sae, d_out]; shapes with others override."""
        blocks = torch.split(self.W_dec, self.io.out_splits, dim=1)
        return torch.stack([b.norm(dim=1) for b in blocks], dim=1)

    # --- inference -------------------------------------------------------------------------
    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the encoder multiplies: x, or x - b_dec (`apply_b_dec_to_input`)."""
        return x - self.b_dec.unsqueeze(-2) if self.apply_b_dec_to_input else x

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """x [batch, d_in] -> pre-activations [batch, d_sae]."""
        return self.encoder_input(x) @ self.W_enc + self.b_enc.unsqueeze(-2)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """Inference-time sparsity: pre-activations -> latents (per token)."""
        raise NotImplementedError

    def train_activation(self, pre: torch.Tensor) -> torch.Tensor:
        """Training-time sparsity (may look at the whole batch, or carry pseudo-gradients)."""
        return self.activation(pre)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.pre_acts(x))

    def decode_latents(self, acts: torch.Tensor | SparseActs) -> torch.Tensor:
        """acts [batch, d_sae] (dense, or the selected entries) -> their decoder sum [batch,
        d_out] (no bias, no skip)."""
        if isinstance(acts, SparseActs):
            return sparse.decode(acts, self.W_dec)
        return acts @ self.W_dec

    def decode(self, acts: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """y_hat = acts @ W_dec + b_dec (a skip transcoder also adds x @ W_skip)."""
        return self.decode_latents(acts) + self.b_dec.unsqueeze(-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), x)

    # --- training --------------------------------------------------------------------------
    def training_forward(self, x: torch.Tensor, progress: TrainProgress | None = None,
                         target: torch.Tensor | None = None) -> TrainOutput:
        """One training forward pass on `x` [batch, d_in] predicting `target` [batch, d_out]
        (default: x). `parts` are the unweighted loss terms."""
        target = x if target is None else target
        if self.sparse_kernels and self.supports_sparse:
            step = self.sparse_step(x, target)
        else:
            step = StepTensors(x, target, *self.dense_forward(x))
        step.y_hat = step.y_hat.float()
        with torch.autocast(x.device.type, enabled=False):  # losses in fp32 under --precision
            terms = self.loss_terms(step)
        loss = sum(_weighted(self.coefficient_at(name, progress), t) for name, t in terms.items())
        self.after_forward(step)
        parts = {name: t.detach() for name, t in terms.items()}
        return TrainOutput(loss, step.y_hat, step.acts, parts)  # type: ignore[arg-type]

    def dense_forward(self, x: torch.Tensor) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """(pre-activations, latents, prediction) of the dense step: the part `--compile` hands
        to torch.compile (one compiled graph per dictionary, made at its first step)."""
        if self.compile_step:
            if "_compiled" not in self.__dict__:
                self.__dict__["_compiled"] = torch.compile(self._dense_forward)
            return self.__dict__["_compiled"](x)
        return self._dense_forward(x)

    def _dense_forward(self, x: torch.Tensor) -> tuple[Any, torch.Tensor, torch.Tensor]:
        pre = self.pre_acts(x)
        acts = self.train_activation(pre)
        return pre, acts, self.decode(acts, x)

    def sparse_step(self, x: torch.Tensor, target: torch.Tensor) -> StepTensors:
        """The forward pass with `acts` as SparseActs (train_sae/dictionaries/sparse.py)."""
        raise NotImplementedError

    def loss_terms(self, step: StepTensors) -> dict[str, torch.Tensor]:
        """Unweighted scalar loss terms; sparsity mixins add theirs to this."""
        return {"mse": mse_per_token(step.target, step.y_hat)}

    def coefficient_at(self, term: str, progress: TrainProgress | None) -> float:
        """The weight of a loss term at this step (TERM_WEIGHTS; 1 if the Config has none)."""
        fields = TERM_WEIGHTS.get(term)
        if fields is None or not hasattr(self.cfg, fields[0]):
            return 1.0
        value, warmup = fields
        return warmed_up(getattr(self.cfg, value),
                         getattr(self.cfg, warmup, 0.0) if warmup else 0.0, progress)

    def latent_weights(self) -> torch.Tensor | None:
        """[d_sae] factor of each latent in a sparsity penalty: its decoder norms summed over the
        output hooks (if `penalty_by_decoder_norm`), else None (every latent counts 1)."""
        return self.decoder_norms().sum(dim=1) if self.penalty_by_decoder_norm else None

    def after_forward(self, step: StepTensors) -> None:
        """Bookkeeping after the loss (e.g. which latents fired)."""

    def before_optimizer_step(self) -> None:
        """Called after backward(), before the optimizer step."""

    def after_optimizer_step(self) -> None:
        """Called after the optimizer step."""

    # --- saving ----------------------------------------------------------------------------
    @staticmethod
    def per_hook_scales(scales: list[float] | float, n: int, what: str) -> list[float]:
        """Per-hook scale factors (one float: the same for all) -> n floats, validated."""
        if isinstance(scales, int | float):
            scales = [float(scales)] * n
        values = [float(s) for s in scales]
        if len(values) != n:
            fail(f"got {len(values)} {what} scales for {n} hooks; pass one scale per hook, in "
                 "hook order")
        if not all(math.isfinite(s) and s > 0 for s in values):
            fail(f"{what} scales must be finite and > 0, got {values}")
        return values

    def scale_columns(self, scales: list[float] | float, splits: list[int], what: str
                      ) -> torch.Tensor:
        """Per-hook scales -> one factor per column of the concatenated hooks: [sum splits]."""
        per_hook = torch.tensor(self.per_hook_scales(scales, len(splits), what))
        return torch.repeat_interleave(per_hook, torch.tensor(splits)).to(self.b_dec.device)

    @torch.no_grad()
    def fold_scaling(self, in_scales: list[float] | float,
                     out_scales: list[float] | float | None = None) -> None:
        """Make a dictionary trained on inputs x_h * s_h and targets y_h * t_h (per hook) map
        raw inputs to raw outputs. Pre-activations (s x - b) W + c = (x - b/s)(s W) + c are
        unchanged, so thresholds and gates stay as they are; outputs are divided by t."""
        out_scales = in_scales if out_scales is None else out_scales
        s_in = self.scale_columns(in_scales, self.io.in_splits, "input")  # [d_in]
        t_out = self.scale_columns(out_scales, self.io.out_splits, "output")  # [d_out]
        if self.apply_b_dec_to_input and not torch.equal(s_in, t_out):
            fail("a dictionary that subtracts b_dec from its input needs equal input and "
                 "output scales")
        self.fold_encoder(s_in)
        self.fold_decoder(t_out)
        self.b_dec.div_(t_out)
        if hasattr(self, "W_skip"):  # y = x W_skip^T, W_skip [d_out, d_in]: (s x) W_skip^T / t
            self.W_skip.mul_(s_in[None, :]).div_(t_out[:, None])

    def fold_encoder(self, s_in: torch.Tensor) -> None:
        """Fold per-column input scales [d_in] into the encoder."""
        self.W_enc.mul_(s_in[:, None])

    def fold_decoder(self, t_out: torch.Tensor) -> None:
        """Divide the decoder by per-column output scales [d_out]."""
        self.W_dec.div_(t_out[None, :])

    def fold_input_scaling(self, scales: list[float] | float) -> None:
        """An autoencoder trained on x * scale (per hook) made to act on raw x."""
        self.fold_scaling(scales, scales)

    def saelens_cfg(self) -> dict:
        """Architecture-specific keys of the saved cfg.json (e.g. `k` for topk)."""
        return {}

    def saelens_state(self) -> dict[str, torch.Tensor]:
        """The inference weights under their saved names and shapes."""
        return {name: getattr(self, name).detach() for name in self.WEIGHTS}

    @torch.no_grad()
    def load_saelens_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of `saelens_state`."""
        for name in self.WEIGHTS:
            getattr(self, name).copy_(state[name])


SAE = Dictionary  # what the single-hook code paths call it


def _weighted(weight: float | torch.Tensor, term: torch.Tensor) -> torch.Tensor:
    """weight * term; stacked members' [M] weights (float64, as a Python float is) are rounded
    to the term's dtype first, as a Python float is, so a stacked member's loss has its bytes."""
    if isinstance(weight, torch.Tensor):
        weight = weight.to(term.dtype)
    return weight * term


def mse_per_token(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Squared error summed over the features, averaged over the batch (SAELens' convention):
    [batch, d] -> [] (stacked members [M, batch, d] -> [M])."""
    return (x_hat - x).pow(2).sum(dim=-1).mean(dim=-1)


def _concat(batch: dict[str, torch.Tensor], hooks: tuple[tuple[str, int], ...], role: str
            ) -> torch.Tensor:
    missing = [h for h, _ in hooks if h not in batch]
    if missing:
        fail(f"the batch has no activations for {role} hooks {missing}; cache them or choose "
             "other hooks")
    blocks = [batch[h] for h, _ in hooks]
    widths = [b.shape[-1] for b in blocks]
    if widths != [d for _, d in hooks]:
        fail(f"{role} hook widths {widths} do not match the dictionary's {[d for _, d in hooks]}")
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=-1)
