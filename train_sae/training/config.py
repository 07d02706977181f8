"""Typed configs for training: one `MemberConfig` per dictionary in a sweep, one `TrainConfig`
shared by all.

Per-architecture optimizer defaults are the architectures' own (`optim_defaults` on each class
in train_sae/dictionaries/), from the recipes the project starts from; the hyperparameters
themselves are declared in train_sae/params.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from shared.errors import check_seed, fail
from train_sae.dictionaries import arch_class, make_config
from train_sae.params import PARAMS

# Hyperparameters that belong to the optimizer / schedule, valid for every architecture.
OPTIM_KEYS = ("lr", "beta1", "beta2", "lr_warmup_steps", "lr_decay_frac", "grad_clip")
DEFAULT_RESAMPLE_AT = (0.25, 0.5, 0.75)
# `--hook all`: every hook of the store
ALL_HOOKS = "all"
# --kernels: the TopK-family step's kernels; "sparse" is the older name of "torch"
KERNELS = ("auto", "torch", "triton", "dense")
KERNEL_ALIASES = {"sparse": "torch"}
# --stack: train members that differ only in optimizer settings and loss weights as one batched
# module (train_sae/training/stack.py); auto: where that is faster
STACKING = ("auto", "on", "off")
# --precision: the dtype of the dictionaries' matmuls (weights, Adam state and losses stay fp32)
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# --kernels auto: the sparse step from this width on, while k is at most this share of it: where
# pipelines/bench/topk_step.py measured it faster than the dense step on a 2-core CPU (0.57x at
# width 512, k 32 / d_in 64 / batch 1024, 0.32x at width 2048, 0.24x at 16384, k 32 / d_in 512 /
# batch 4096; about even at width 256, k 8)
SPARSE_MIN_WIDTH = 512
SPARSE_MAX_K_SHARE = 1 / 16


def use_sparse_kernels(kernels: str, width: int, k: int | None) -> bool:
    """Whether a member of this width and k trains with the sparse step (if it has one)."""
    if kernels != "auto":
        return kernels in ("torch", "triton")
    return width >= SPARSE_MIN_WIDTH and (k is None or k <= SPARSE_MAX_K_SHARE * width)


def sparse_backend(kernels: str, device: str) -> str:
    """Whose kernels run the sparse step: triton when asked (or, with auto, on CUDA where triton
    is installed), else torch's CSR ops. `--kernels triton` where it cannot run is refused."""
    from train_sae.dictionaries import triton_kernels

    on_cuda = torch.device(device).type == "cuda"
    if kernels == "triton":
        reason = triton_kernels.unavailable_reason()
        if reason is None and not on_cuda and not triton_kernels.interpreting():
            reason = (f"--kernels triton runs on CUDA devices, not {device}; use --kernels "
                      "torch")
        if reason is not None:
            fail(reason)
        return "triton"
    if kernels == "auto" and on_cuda and triton_kernels.available():
        return "triton"
    return "torch"


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
        for name in OPTIM_KEYS:  # typed and in range (train_sae/params.py)
            object.__setattr__(self, name, PARAMS[name].check(getattr(self, name)))


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
    """One dictionary of a sweep: architecture, width, its typed hyperparameters (the arch's
    Config; a dict is turned into one), optimizer, resampling, and the hooks it maps."""

    arch: str
    d_sae: int
    params: Any = None  # the arch's Config (train_sae/dictionaries/); None: its defaults
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4))
    resample: ResampleConfig = field(default_factory=ResampleConfig)
    name: str = ""
    # store hooks it reads, in order: one for an SAE or transcoder, several for a crosscoder or
    # CLT; () = the sweep's only hook (or, for a crosscoder, all of the sweep's hooks)
    hooks: tuple[str, ...] = ()
    # store hooks it predicts, in order; () = the hooks it reads (an SAE, a crosscoder)
    out_hooks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.params is None or isinstance(self.params, dict):
            object.__setattr__(self, "params", make_config(self.arch, self.params or {}))

    @property
    def sparsity(self) -> str | None:
        return getattr(self.params, "sparsity", None)

    @property
    def io_kind(self) -> str:
        """"sae", "crosscoder", "transcoder" or "clt" (train_sae/dictionaries/base.py)."""
        return arch_class(self.arch).io_kind

    @property
    def resamples(self) -> bool:
        """Whether Anthropic resampling applies to its architecture."""
        return arch_class(self.arch).resamples

    @property
    def outputs(self) -> tuple[str, ...]:
        """The hooks it predicts."""
        return self.out_hooks or self.hooks

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "d_sae": self.d_sae, "params": self.params.to_dict(),
                "optim": asdict(self.optim),
                "resample": {"enabled": self.resample.enabled, "at": list(self.resample.at)},
                "name": self.name, "hooks": list(self.hooks), "out_hooks": list(self.out_hooks)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MemberConfig:
        r = dict(d["resample"])
        r["at"] = tuple(r["at"])
        return cls(arch=d["arch"], d_sae=int(d["d_sae"]), params=dict(d["params"]),
                   optim=OptimConfig(**d["optim"]), resample=ResampleConfig(**r), name=d["name"],
                   hooks=tuple(d.get("hooks", ())), out_hooks=tuple(d.get("out_hooks", ())))

    def hyperparameters(self) -> dict[str, Any]:
        """Flat view for metrics.json and reports."""
        hp: dict[str, Any] = {"width": self.d_sae, **self.params.to_dict(), **asdict(self.optim)}
        if self.resamples:
            hp["resample"] = self.resample.enabled
            if self.resample.enabled:
                hp["resample_at"] = list(self.resample.at)
        return hp


@dataclass(frozen=True)
class StepOptions:
    """How every member's training step runs (not what it trains): --kernels, --precision and
    --compile."""

    kernels: str = "auto"
    precision: str = "fp32"
    compile: bool = False  # the dense step's forward through torch.compile


@dataclass(frozen=True)
class TrainConfig:
    """Settings shared by every member of a sweep (one store, one stream of batches)."""

    store: str  # a local folder or any fsspec URL
    out: str
    hooks: tuple[str, ...] = ()  # hooks to train on; () = the store's only hook, ("all",) = all
    # hooks transcoders and CLTs predict, in order (--out-hook): the i-th transcoder reads
    # hooks[i] and predicts out_hooks[i]; a CLT reads every hook and predicts every out hook
    out_hooks: tuple[str, ...] = ()
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
    # TopK-family training step: "sparse" (decode and gradients from the selected latents only,
    # train_sae/dictionaries/sparse.py), "dense", or "auto" (sparse where it is the faster one)
    kernels: str = "auto"
    # matmuls under autocast in bf16 / fp16 (fp16 with loss scaling), master weights fp32
    precision: str = "fp32"
    # members that differ only in optimizer settings and loss weights as one batched module
    stack: str = "auto"
    compile: bool = False  # the dense step's forward through torch.compile
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
        object.__setattr__(self, "kernels", KERNEL_ALIASES.get(self.kernels, self.kernels))
        if self.kernels not in KERNELS:
            fail(f"--kernels must be one of {', '.join(KERNELS)}, got {self.kernels!r}")
        if self.precision not in PRECISIONS:
            fail(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.stack not in STACKING:
            fail(f"--stack must be one of {', '.join(STACKING)}, got {self.stack!r}")
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
        for option, hooks in (("--hook", self.hooks), ("--out-hook", self.out_hooks)):
            twice = sorted({h for h in hooks if hooks.count(h) > 1})
            if twice:
                fail(f"{option} {twice[0]} is given twice; name each hook once")
        if ALL_HOOKS in self.hooks and len(self.hooks) > 1:
            fail(f"--hook {ALL_HOOKS} already means every hook of the store; drop the other --hook")

    def step_options(self) -> StepOptions:
        return StepOptions(self.kernels, self.precision, self.compile)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hooks"] = list(self.hooks)  # as JSON reads it back, so a resume compares equal
        d["out_hooks"] = list(self.out_hooks)
        return d
