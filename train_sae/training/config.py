"""Typed configs for training: one `MemberConfig` per SAE in a sweep, one `TrainConfig` shared by all.

Per-architecture optimizer defaults (`default_optim`) follow the recipes the project starts from:
- april: Adam lr 5e-5, betas (0.9, 0.999), no LR warm-up, linear LR decay to 0 over the last 20%,
  grad-norm clip 1.0 (seed 004, Anthropic April 2024 update; its L1 warm-up lives in the SAE).
- relu: Adam lr 1e-3 at batch 4096, scaled by sqrt(batch / 4096); LR warm-up from 1/10 over
  min(1000, 5% of steps) at the start and again after every Anthropic resampling, resampling at 25%,
  50% and 75% of training (seed 003, tricks 2 and 3).
- topk / batchtopk: lr 2e-4 / sqrt(width / 2^14) (Gao et al. 2024, sec. 2.1 scaling), no decay.
- jumprelu: lr 7e-5 (Rajamanoharan et al. 2024b); gated: lr 5e-5 (Rajamanoharan et al. 2024a).
- crosscoder (ReLU + L1): the April-update settings seed 001 follows: Adam lr 5e-5, betas
  (0.9, 0.999), LR decay over the last 20%, grad-norm clip 1.0; the L1 warm-up (5%) lives in the
  crosscoder. crosscoder_topk: the topk rule above (no penalty to warm up, so no reason for 5e-5).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from shared.errors import check_seed, fail

# Hyperparameters that belong to the optimizer / schedule, valid for every architecture.
OPTIM_KEYS = ("lr", "beta1", "beta2", "lr_warmup_steps", "lr_decay_frac", "grad_clip")
# Anthropic resampling (Towards Monosemanticity) applies to the unit-norm-decoder ReLU SAE only.
RESAMPLE_ARCHS = frozenset({"relu"})
DEFAULT_RESAMPLE_AT = (0.25, 0.5, 0.75)
# Architectures that read several hooks at once (train_sae/dictionaries/crosscoder.py), the rest read one.
CROSSCODER_ARCHS = frozenset({"crosscoder", "crosscoder_topk"})
# `--hook all`: every hook of the store
ALL_HOOKS = "all"


@dataclass(frozen=True)
class OptimConfig:
    """Adam and LR schedule of one member."""

    lr: float
    beta1: float = 0.9
    beta2: float = 0.999
    lr_warmup_steps: int = 0  # warm-up from lr/10 at the start and after each resampling
    lr_decay_frac: float = 0.0  # linear decay to 0 over this final fraction of steps
    grad_clip: float = 0.0  # max global grad norm; 0 = no clipping

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            fail(f"--lr must be a positive number, got {self.lr}")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                fail(f"--{name} must be in [0, 1), got {v}")
        if self.lr_warmup_steps < 0:
            fail(f"--lr-warmup-steps must be >= 0, got {self.lr_warmup_steps}")
        if not 0.0 <= self.lr_decay_frac <= 1.0:
            fail(f"--lr-decay-frac must be in [0, 1], got {self.lr_decay_frac}")
        if self.grad_clip < 0:
            fail(f"--grad-clip must be >= 0 (0 turns clipping off), got {self.grad_clip}")


@dataclass(frozen=True)
class ResampleConfig:
    """Anthropic resampling of dead latents at fractions of training (relu only)."""

    enabled: bool = False
    at: tuple[float, ...] = DEFAULT_RESAMPLE_AT  # fractions of total steps

    def __post_init__(self) -> None:
        if any(not 0.0 < f < 1.0 for f in self.at):
            fail(f"--resample-at fractions must lie strictly between 0 and 1, got {list(self.at)}")

    def steps(self, total_steps: int) -> list[int]:
        """The steps (before which) resampling happens; empty when disabled."""
        if not self.enabled:
            return []
        return sorted({max(1, int(round(f * total_steps))) for f in self.at})


@dataclass(frozen=True)
class MemberConfig:
    """One SAE of a sweep: architecture, width, its own hyperparameters, optimizer, resampling."""

    arch: str
    d_sae: int
    params: dict[str, Any] = field(default_factory=dict)  # arch hyperparameters (see arch_params)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4))
    resample: ResampleConfig = field(default_factory=ResampleConfig)
    name: str = ""
    # store hooks it reads, in order: one for an SAE, all of a crosscoder's; () = the sweep's
    # only hook (or, for a crosscoder, all of the sweep's hooks)
    hooks: tuple[str, ...] = ()

    @property
    def is_crosscoder(self) -> bool:
        return self.arch in CROSSCODER_ARCHS

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["resample"]["at"] = list(self.resample.at)
        d["hooks"] = list(self.hooks)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MemberConfig:
        r = dict(d["resample"])
        r["at"] = tuple(r["at"])
        return cls(arch=d["arch"], d_sae=int(d["d_sae"]), params=dict(d["params"]),
                   optim=OptimConfig(**d["optim"]), resample=ResampleConfig(**r), name=d["name"],
                   hooks=tuple(d.get("hooks", ())))

    def hyperparameters(self) -> dict[str, Any]:
        """Flat view for metrics.json and reports."""
        hp: dict[str, Any] = {"width": self.d_sae, **self.params, **asdict(self.optim)}
        if self.arch in RESAMPLE_ARCHS:
            hp["resample"] = self.resample.enabled
            if self.resample.enabled:
                hp["resample_at"] = list(self.resample.at)
        return hp


@dataclass(frozen=True)
class TrainConfig:
    """Settings shared by every member of a sweep (one store, one stream of batches)."""

    store: str  # a local folder or any fsspec URL
    out: str
    hooks: tuple[str, ...] = ()  # hooks to train on; () = the store's only hook, ("all",) = all
    tokens: int | None = None  # training budget; None: every row of the store once
    batch_size: int = 4096
    device: str = "auto"  # cpu | cuda | auto
    seed: int = 0
    checkpoint_every: int = 0  # steps between checkpoints; 0 = no checkpoints
    log_every: int = 100
    wandb_project: str | None = None
    resume: bool = False
    overwrite: bool = False
    normalize: bool = True  # April-update scaling by sqrt(d_in) / mean_norm (off: scale 1)
    progress: bool = True  # the tqdm bar on stderr
    diverge_factor: float = 1e3  # a member whose loss exceeds this x its first loss is stopped
    # under torchrun: train every member on every rank, each rank on its share of every batch
    # (gradients averaged), instead of spreading the members over the ranks
    data_parallel: bool = False
    # --storage-option: how to reach a remote store (fsspec filesystem kwargs), not a setting
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            fail(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.tokens is not None and self.tokens < self.batch_size:
            fail(f"--tokens ({self.tokens}) must be at least one batch (--batch-size {self.batch_size})")
        if self.device not in ("cpu", "cuda", "auto"):
            fail(f"--device must be cpu, cuda or auto, got {self.device!r}")
        if self.checkpoint_every < 0:
            fail(f"--checkpoint-every must be >= 0 (0 = no checkpoints), got {self.checkpoint_every}")
        if not self.diverge_factor > 1:
            fail(f"diverge_factor must be > 1, got {self.diverge_factor}")
        if self.log_every < 1:
            fail(f"--log-every must be >= 1, got {self.log_every}")
        check_seed(self.seed)
        if self.resume and self.overwrite:
            fail("--resume and --overwrite contradict each other; choose one")
        twice = sorted({h for h in self.hooks if self.hooks.count(h) > 1})
        if twice:
            fail(f"--hook {twice[0]} is given twice; name each hook once")
        if ALL_HOOKS in self.hooks and len(self.hooks) > 1:
            fail(f"--hook {ALL_HOOKS} already means every hook of the store; drop the other --hook")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hooks"] = list(self.hooks)  # as JSON reads it back, so a resume compares equal
        return d


# what each value type is called in messages, and an example of one
_KINDS: dict[type, tuple[str, str]] = {
    int: ("whole numbers", "64"), float: ("finite numbers", "0.001"), bool: ("on/off values", "on"),
    str: ("names", '"topk"'),
}


def typed(value: Any, kind: type, what: str) -> Any:
    """`value` (as parsed from the command line or a TOML file) as a `kind` (int, float, bool or
    str), or a UserError naming `what` (the option) and the type expected. A whole float (1e3)
    counts as an int, an int as a float; a bool is neither."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if kind is float and number and math.isfinite(value):
        return float(value)
    if kind is int and number and float(value).is_integer():
        return int(value)
    if kind in (bool, str) and isinstance(value, kind):
        return value
    desc, example = _KINDS[kind]
    fail(f"{what} takes {desc}, got {value!r}; write e.g. {example}")


def default_optim(arch: str, d_sae: int, batch_size: int, total_steps: int) -> dict[str, Any]:
    """Per-architecture optimizer defaults (see the module docstring for sources)."""
    warm = min(1000, total_steps // 20)
    if arch in ("april", "crosscoder"):
        return {"lr": 5e-5, "lr_decay_frac": 0.2, "grad_clip": 1.0}
    if arch == "relu":
        return {"lr": 1e-3 * math.sqrt(batch_size / 4096), "lr_warmup_steps": warm,
                "grad_clip": 1.0}
    if arch in ("topk", "batchtopk", "crosscoder_topk"):
        return {"lr": 2e-4 / math.sqrt(d_sae / 2**14)}
    if arch == "jumprelu":
        return {"lr": 7e-5, "lr_warmup_steps": warm}
    if arch == "gated":
        return {"lr": 5e-5, "lr_warmup_steps": warm}
    return {"lr": 1e-4}
