"""The interface every SAE architecture implements; the trainer and evals see only this.

One module per architecture under `train_sae/dictionaries/`, each registering itself in
`train_sae.dictionaries.REGISTRY` under its `--arch` name. Shapes are in names: `x: [batch, d_in]`,
`acts: [batch, d_sae]`.

Training-time flow for one step of one member (see train_sae/training/member.py):

    out = sae.training_forward(x, progress)    # TrainOutput: loss + parts, acts, x_hat
    out.loss.backward()
    sae.before_optimizer_step()                # e.g. project out decoder-norm gradient
    optimizer.step()
    sae.after_optimizer_step()                 # e.g. renormalise decoder rows

Activations reaching the SAE during training are already multiplied by the store's scaling
factor `sqrt(d_in) / mean_norm`; `fold_input_scaling(scale)` rewrites the weights so that the
saved SAE takes and returns unscaled activations.

Statistics over the whole batch inside a loss (AuxK's dead latents and residual variance,
BatchTopK's budget) go through `sae.batch_group` (a `BatchGroup`): one process holding every row
by default, or data-parallel ranks each holding an equal share (`ShardedBatch`), so that a share
computes what the whole batch would.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from shared.distributed import World


@dataclass
class TrainProgress:
    """Where training stands, for schedules that live inside a loss (L1 warm-up, AuxK)."""

    step: int
    total_steps: int
    tokens_seen: int


@dataclass
class TrainOutput:
    loss: torch.Tensor  # scalar, what backward() is called on
    x_hat: torch.Tensor  # [batch, d_in]
    acts: torch.Tensor  # [batch, d_sae] latent activations (post nonlinearity)
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


class SAE(nn.Module):
    """Base class: encode / decode / training loss, plus optional training-time hooks."""

    arch: str = ""
    saelens_architecture: str = ""  # the SAELens architecture it is saved as (train_sae/training/saving.py)
    apply_b_dec_to_input: bool = False  # whether encode subtracts b_dec from x first
    WEIGHTS: tuple[str, ...] = ()  # the inference parameters, under their SAELens names
    batch_group: BatchGroup = WHOLE_BATCH  # who holds the training batch (the trainer sets it)

    def __init__(self, d_in: int, d_sae: int):
        super().__init__()
        self.d_in = d_in
        self.d_sae = d_sae

    # --- inference -------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """acts [batch, d_sae] -> x_hat = acts @ W_dec + b_dec (every architecture here)."""
        return acts @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    # --- training --------------------------------------------------------------------------
    def training_forward(self, x: torch.Tensor, progress: TrainProgress) -> TrainOutput:
        raise NotImplementedError

    def before_optimizer_step(self) -> None:
        """Called after backward(), before the optimizer step."""

    def after_optimizer_step(self) -> None:
        """Called after the optimizer step."""

    # --- saving ----------------------------------------------------------------------------
    def fold_input_scaling(self, scale: float) -> None:
        """Make an SAE trained on `x * scale` act on raw `x` (and reconstruct raw `x`)."""
        raise NotImplementedError

    def saelens_cfg(self) -> dict:
        """Architecture-specific keys of the SAELens cfg.json (e.g. `k` for topk)."""
        return {}

    def saelens_state(self) -> dict[str, torch.Tensor]:
        """The inference weights under SAELens' names and shapes."""
        return {name: getattr(self, name).detach() for name in self.WEIGHTS}

    @torch.no_grad()
    def load_saelens_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of `saelens_state`."""
        for name in self.WEIGHTS:
            getattr(self, name).copy_(state[name])
