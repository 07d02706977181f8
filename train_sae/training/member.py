"""One member of a one-pass sweep: a dictionary (SAE, crosscoder, transcoder, CLT) with its
optimizer, LR schedule, Anthropic resampling, metric counters and checkpoint state.

What a member reads and predicts is its dictionary's: `inputs(batch)` concatenates its input
hooks' blocks of the loader's batch ([batch, d_in]), `targets(batch)` its output hooks'
([batch, d_out]; the same as the inputs for an SAE or crosscoder). Everything else treats every
dictionary alike.

A member's training depends on nothing but its own config, the sweep's seed and the batches: its
initial weights come from the seed, its resampling RNG from the seed and its name, and its
resampling pool holds the last whole batches of its hook (shared by the members of one process
but the same whatever they are). So a member trains to the same bytes alone, beside any other
members, or on any rank of a `torchrun` sweep. With data-parallel ranks (`batch_group` a
`ShardedBatch`), every rank holds the member and a share of each batch's rows; its gradients,
loss, firing counts and metrics are those of the whole batch, the same on every rank.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch

from train_sae.dictionaries import IO, build
from train_sae.dictionaries.base import (
    WHOLE_BATCH,
    BatchGroup,
    Dictionary,
    TrainOutput,
    TrainProgress,
)
from train_sae.evaluation.metrics import FeatureDensity, firing_counts, metric_tensors
from train_sae.training.config import (
    PRECISIONS,
    MemberConfig,
    StepOptions,
    sparse_backend,
    use_sparse_kernels,
)
from train_sae.training.metrics_log import MetricsLog
from train_sae.training.resampling import BatchPool, resample_dead
from train_sae.training.schedules import LRSchedule
from train_sae.training.sweep import HOOK_SEP, hook_prefix

FINAL_WINDOW_FRAC = 0.1  # "final" metrics and saved feature density: the last 10% of steps


def member_io(cfg: MemberConfig, dims: dict[str, int]) -> IO:
    """The hooks a member reads and predicts, with their widths (dims: hook -> width)."""
    return IO.of({h: dims[h] for h in cfg.hooks}, {h: dims[h] for h in cfg.outputs})


def build_model(cfg: MemberConfig, dims: dict[str, int], seed: int) -> Dictionary:
    """The member's freshly initialised dictionary over its hooks (dims: hook -> width)."""
    return build(cfg.arch, member_io(cfg, dims), cfg.d_sae, cfg.params, seed)


def resample_seed(cfg: MemberConfig, seed: int) -> int:
    """Seed of a member's resampling RNG: from its hook and its name without the hook prefix, so
    adding members or hooks to a sweep changes nothing."""
    prefix = hook_prefix(cfg.hooks[0]) + HOOK_SEP
    base = cfg.name[len(prefix):] if cfg.name.startswith(prefix) else cfg.name
    return seed * 1_000_003 + zlib.crc32(f"{'+'.join(cfg.hooks)}:{base}".encode())


class Member:
    """One member's model and training state; `step` trains it on one batch dict."""

    def __init__(self, cfg: MemberConfig, dims: dict[str, int], total_steps: int, seed: int,
                 device: str, diverge_factor: float, batch_group: BatchGroup = WHOLE_BATCH,
                 options: StepOptions = StepOptions()):
        assert cfg.hooks, cfg  # bound by trainer.bind_hooks
        self.cfg, self.name, self.hooks = cfg, cfg.name, cfg.hooks
        self.sae = build_model(cfg, dims, seed).to(device)
        self.batch = self.sae.batch_group = batch_group  # who holds each batch's rows
        self.sae.sparse_kernels = self.sae.supports_sparse and use_sparse_kernels(
            options.kernels, cfg.d_sae, getattr(cfg.params, "k", None))
        if self.sae.sparse_kernels:
            self.sae.sparse_backend = sparse_backend(options.kernels, device)
        self.sae.compile_step = options.compile
        # --precision: the forward's matmuls under autocast; fp16 scales the loss so that small
        # gradients survive (torch.amp.GradScaler), then unscales before clipping and Adam
        self.device_type = torch.device(device).type
        self.autocast = PRECISIONS[options.precision]
        self.scaler = torch.amp.GradScaler(self.device_type,
                                           enabled=options.precision == "fp16")
        # per-hook metrics of a dictionary predicting several hooks: hook -> its width
        self.blocks = {h: dims[h] for h in cfg.outputs} if len(cfg.outputs) > 1 else None
        o = cfg.optim
        # the fused kernel: one pass over each parameter instead of five (Adam on the CPU took
        # about a sixth of a sparse TopK step)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=o.lr, betas=(o.beta1, o.beta2),
                                    fused=True)
        self.resample_steps = cfg.resample.steps(total_steps) if cfg.resamples else []
        # dead = no firing in the second half of the interval before each resampling (Anthropic:
        # 12.5k steps before resampling every 25k), so the busy first steps do not hide dead latents
        prev = [0, *self.resample_steps][: len(self.resample_steps)]
        self.dead_window_starts = {r - (r - p) // 2 for r, p in zip(self.resample_steps, prev,
                                                                     strict=True)}
        self.schedule = LRSchedule(o.lr, total_steps, o.lr_warmup_steps, o.lr_decay_frac,
                                   tuple(self.resample_steps))
        self.rng = torch.Generator().manual_seed(resample_seed(cfg, seed))
        self.diverge_factor = diverge_factor
        self.final_start = total_steps - max(1, int(total_steps * FINAL_WINDOW_FRAC))
        self.log_density = FeatureDensity(cfg.d_sae, device)  # since the last log line
        self.dead_density = FeatureDensity(cfg.d_sae, device)  # window before the next resampling
        self.final_density = FeatureDensity(cfg.d_sae, device)  # over the final window
        self.final_sums: dict[str, torch.Tensor] = {}  # metric -> sum over the final window
        self.final_steps = 0
        self.status, self.failure = "running", None
        self.first_loss: float | None = None
        self.resampled = 0
        self.log: MetricsLog | None = None
        self.relative_norms: dict[str, Any] | None = None  # two-hook crosscoders, once saved
        self.lr = o.lr  # this step's, from the schedule

    # --- one training step ------------------------------------------------------------------
    # `step` is the four phases below in order; a stack of members (train_sae/training/stack.py)
    # runs `begin_step` and `apply_gradients` / `record` per member around one batched forward
    # and backward.
    def step(self, batch: dict[str, torch.Tensor], step: int, progress: TrainProgress,
             pools: dict[str, BatchPool], log: bool) -> tuple[torch.Tensor, dict[str, Any] | None]:
        """Train on this step's batch (this process's rows of it; `pools` hold whole batches).
        Returns the whole batch's detached loss and, when `log`, the metrics record (built here
        so no member's activations outlive its step)."""
        x, y = self.begin_step(batch, step, pools)
        with self.autocast_context():
            out = self.sae.training_forward(x, progress, y)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(out.loss).backward()
        loss = self.apply_gradients(out.loss)
        return loss, self.record(out, y, step, loss, log)

    def begin_step(self, batch: dict[str, torch.Tensor], step: int, pools: dict[str, BatchPool]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Resample dead latents if due and set the step's LR; returns (inputs, targets)."""
        x = self.sae.inputs(batch)
        y = x if self.cfg.outputs == self.hooks else self.sae.targets(batch)
        if step in self.resample_steps and self.hooks[0] in pools:
            self.resampled += resample_dead(self.sae, self.opt, self.dead_density.dead_mask(),
                                            pools[self.hooks[0]].rows(), self.rng)
        self.lr = self.schedule.lr(step)
        for group in self.opt.param_groups:
            group["lr"] = self.lr
        return x, y

    def autocast_context(self) -> torch.autocast:
        """--precision: the forward's matmuls in bf16 / fp16 (a no-op in fp32)."""
        return torch.autocast(self.device_type, dtype=self.autocast,
                              enabled=self.autocast != torch.float32)

    def apply_gradients(self, loss: torch.Tensor) -> torch.Tensor:
        """The optimizer step from the gradients backward() left; returns the whole batch's
        detached loss (averaged over data-parallel ranks)."""
        loss = self.batch.reduce_gradients(self.sae.parameters(), loss.detach())
        # after the reduction, so that every data-parallel rank sees the same overflow
        self.scaler.unscale_(self.opt)  # a no-op unless fp16
        self.sae.before_optimizer_step()
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.sae.parameters(), self.cfg.optim.grad_clip)
        self.scaler.step(self.opt)  # skipped when fp16 gradients overflowed
        self.scaler.update()
        self.sae.after_optimizer_step()
        return loss

    def record(self, out: TrainOutput, y: torch.Tensor, step: int, loss: torch.Tensor, log: bool
               ) -> dict[str, Any] | None:
        """Firing densities and final-window sums of this step; at a log step, its record."""
        in_final = step >= self.final_start
        metrics = None
        with torch.no_grad():
            acts = out.acts.detach()
            fired = self.batch.sum(firing_counts(acts))  # [d_sae] over the whole batch
            n_rows = self.batch.rows(acts.shape[0])
            self.log_density.add(fired, n_rows)
            if step in self.dead_window_starts:
                self.dead_density.reset()
            if self.resample_steps:
                self.dead_density.add(fired, n_rows)
            if in_final or log:
                metrics = metric_tensors(y, out.x_hat, acts, self.blocks, self.batch)
            if in_final:
                self.final_density.add(fired, n_rows)
                for k, v in metrics.items():  # type: ignore[union-attr]
                    self.final_sums[k] = self.final_sums.get(k, 0.0) + v.double()
                self.final_steps += 1
        if not log:
            return None
        rec: dict[str, Any] = {"step": step + 1, "tokens": (step + 1) * n_rows, "lr": self.lr,
                               "loss": float(loss)}
        rec.update({k: float(v) for k, v in self.batch.average(out.parts).items()})
        rec.update({k: float(v) for k, v in metrics.items()})  # type: ignore[union-attr]
        rec.update(dead_fraction=self.log_density.dead_fraction,
                   dense_fraction=self.log_density.dense_fraction,
                   density_tokens=self.log_density.n_tokens)
        self.log_density.reset()
        if self.resample_steps:
            rec["resampled_total"] = self.resampled
        return rec

    def check(self, loss: float, step: int) -> None:
        """Mark the member failed on a non-finite or diverging loss."""
        if loss != loss or loss in (float("inf"), float("-inf")):
            self.fail(f"loss became {loss} at step {step}; lower the learning rate (--lr)")
        elif self.first_loss is None:
            self.first_loss = loss
        elif loss > self.diverge_factor * max(self.first_loss, 1e-12):
            self.fail(f"loss diverged at step {step}: {loss:.4g} > {self.diverge_factor:g} x its "
                      f"first value {self.first_loss:.4g}; lower the learning rate (--lr)")

    def fail(self, reason: str) -> None:
        self.status, self.failure = "failed", reason
        self.sae = None  # type: ignore[assignment]  # free its memory; its weights are not saved
        self.opt = None  # type: ignore[assignment]

    def final_metrics(self) -> dict[str, float]:
        """Means over the final window: l0, mse, fvu, cos_sim, l2_ratio (and, predicting several
        hooks, fvu/<hook>, mse/<hook>), plus dead and dense fractions."""
        n = max(self.final_steps, 1)
        out = {k: float(v) / n for k, v in self.final_sums.items()}
        out["dead_fraction"] = self.final_density.dead_fraction
        out["dense_fraction"] = self.final_density.dense_fraction
        return out

    # --- checkpoint state -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        s: dict[str, Any] = {"status": self.status, "failure": self.failure,
                             "first_loss": self.first_loss, "resampled": self.resampled,
                             "log_offset": self.log.offset() if self.log else 0}
        if self.status == "running":
            s.update(sae=self.sae.state_dict(), opt=self.opt.state_dict(),
                     scaler=self.scaler.state_dict(),
                     rng=self.rng.get_state(),
                     final_sums={k: torch.as_tensor(v).clone() for k, v in self.final_sums.items()},
                     final_steps=self.final_steps,
                     densities=[d.state_dict() for d in
                                (self.log_density, self.dead_density, self.final_density)])
        return s

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.status, self.failure = s["status"], s["failure"]
        self.first_loss, self.resampled = s["first_loss"], s["resampled"]
        if self.status != "running":
            self.sae = self.opt = None  # type: ignore[assignment]
            return
        self.sae.load_state_dict(s["sae"])
        self.opt.load_state_dict(s["opt"])
        if s.get("scaler"):
            self.scaler.load_state_dict(s["scaler"])
        self.rng.set_state(s["rng"])
        device = self.final_density.counts.device
        self.final_sums = {k: v.to(device) for k, v in s["final_sums"].items()}
        self.final_steps = s["final_steps"]
        for d, ds in zip((self.log_density, self.dead_density, self.final_density),
                         s["densities"], strict=True):
            d.load_state_dict(ds)
