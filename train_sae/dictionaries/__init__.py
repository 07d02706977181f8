"""SAE architectures by `--arch` name, and `build_sae` to make one from a plain dict of options.

Each architecture class carries a `Config` dataclass of its own hyperparameters (not d_in or
d_sae), validated in `__post_init__`; `arch_params(arch)` lists their names so a sweep only crosses
the options that apply to each architecture.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from shared.errors import fail
from train_sae.dictionaries.april import AprilSAE
from train_sae.dictionaries.base import SAE, TrainOutput, TrainProgress
from train_sae.dictionaries.batchtopk import BatchTopKSAE
from train_sae.dictionaries.gated import GatedSAE
from train_sae.dictionaries.jumprelu import JumpReLUSAE
from train_sae.dictionaries.relu import ReluSAE
from train_sae.dictionaries.topk import TopKSAE

REGISTRY: dict[str, type[SAE]] = {
    cls.arch: cls for cls in (ReluSAE, AprilSAE, TopKSAE, BatchTopKSAE, JumpReLUSAE, GatedSAE)
}

__all__ = ["REGISTRY", "SAE", "TrainOutput", "TrainProgress", "arch_params", "build_sae",
           "make_config"]


def _arch_class(arch: str) -> type[SAE]:
    if arch not in REGISTRY:
        fail(f"unknown architecture {arch!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[arch]


def arch_params(arch: str) -> set[str]:
    """Names of the hyperparameters that apply to `arch` (the fields of its Config)."""
    return {f.name for f in dataclasses.fields(_arch_class(arch).Config)}


def make_config(arch: str, params: dict[str, Any]) -> Any:
    """The validated Config of `arch` from `params`; unknown names are a UserError."""
    cls = _arch_class(arch)
    unknown = sorted(set(params) - arch_params(arch))
    if unknown:
        fail(
            f"{', '.join(unknown)} does not apply to arch {arch!r}; its options are: "
            f"{', '.join(sorted(arch_params(arch)))}"
        )
    return cls.Config(**params)


def build_sae(arch: str, d_in: int, d_sae: int, params: dict[str, Any], seed: int) -> SAE:
    """A freshly initialised SAE; the same arguments (seed included) give identical weights."""
    if d_in < 1:
        fail(f"d_in must be >= 1 (got {d_in})")
    if d_sae < 1:
        fail(f"SAE width must be >= 1 (got {d_sae}); pass a positive --width")
    cfg = make_config(arch, params)
    return REGISTRY[arch](d_in, d_sae, cfg, seed)
