"""Every dictionary by `--arch` name: the one registry, and `build` to make one.

An architecture is one class (or, for a shape that composes with every sparsity, one class per
sparsity: `compose` in sparsity.py) with a `Config` dataclass of its hyperparameters, each
declared in train_sae/params.py. Adding one: write its file (a shape from common.py,
crosscoder.py, transcoder.py or clt.py plus a sparsity mixin, or a subclass of an existing
architecture, overriding what differs) and add its class to `ARCHITECTURES` below; the CLI,
the sweep grid, TOML files, training, saving and eval find it from there (README, "Adding an
architecture").
"""

from __future__ import annotations

import dataclasses
from typing import Any

from shared.errors import fail
from train_sae.dictionaries.april import AprilSAE
from train_sae.dictionaries.base import IO, SAE, Dictionary, TrainOutput, TrainProgress
from train_sae.dictionaries.batchtopk import BatchTopKSAE
from train_sae.dictionaries.clt import CLTS
from train_sae.dictionaries.crosscoder import Crosscoder, TopKCrosscoder
from train_sae.dictionaries.gated import GatedSAE
from train_sae.dictionaries.jumprelu import JumpReLUSAE
from train_sae.dictionaries.matryoshka import MatryoshkaBatchTopKSAE
from train_sae.dictionaries.relu import ReluSAE
from train_sae.dictionaries.sparsity import SIGNATURE
from train_sae.dictionaries.topk import TopKSAE
from train_sae.dictionaries.transcoder import TRANSCODERS

ARCHITECTURES: list[type[Dictionary]] = [
    ReluSAE, AprilSAE, TopKSAE, BatchTopKSAE, JumpReLUSAE, GatedSAE, MatryoshkaBatchTopKSAE,
    Crosscoder, TopKCrosscoder,
    *TRANSCODERS,
    *CLTS,
]

# arch -> {sparsity: class}; the first sparsity of an arch is its default
REGISTRY: dict[str, dict[str, type[Dictionary]]] = {}


def register(cls: type[Dictionary]) -> type[Dictionary]:
    """List `cls` under its `arch` (and `sparsity`); usable as a class decorator."""
    REGISTRY.setdefault(cls.arch, {})[cls.sparsity] = cls
    return cls


for _cls in ARCHITECTURES:
    register(_cls)

__all__ = ["IO", "REGISTRY", "SAE", "Dictionary", "TrainOutput", "TrainProgress", "arch_class",
           "arch_params", "build", "build_sae", "make_config", "register"]


def check_arch(arch: str) -> None:
    if arch not in REGISTRY:
        fail(f"unknown architecture {arch!r}; choose one of {', '.join(REGISTRY)}")


def composable(arch: str) -> bool:
    """Whether the arch comes in several sparsities (chosen by `sparsity` or the options)."""
    check_arch(arch)
    return len(REGISTRY[arch]) > 1


def arch_class(arch: str, sparsity: str | None = None) -> type[Dictionary]:
    check_arch(arch)
    variants = REGISTRY[arch]
    if sparsity is None:
        return next(iter(variants.values()))
    if sparsity not in variants:
        fail(f"arch {arch!r} has no sparsity {sparsity!r}; choose one of {', '.join(variants)}")
    return variants[sparsity]


def io_kind(arch: str) -> str:
    """Which hooks it maps: "sae", "crosscoder", "transcoder" or "clt"."""
    return arch_class(arch).io_kind


def config_fields(cls: type[Dictionary]) -> set[str]:
    return {f.name for f in dataclasses.fields(cls.Config)}


def arch_params(arch: str, sparsity: str | None = None) -> set[str]:
    """Names of the hyperparameters of `arch` (of one sparsity, or of any of them)."""
    check_arch(arch)
    if sparsity is not None:
        return config_fields(arch_class(arch, sparsity))
    return set().union(*(config_fields(c) for c in REGISTRY[arch].values()))


def sparsities(arch: str, given: set[str]) -> list[str]:
    """The sparsities a sweep makes of a composable `arch` from the names of the options given:
    those whose signature option (k: topk, l1_coefficient: relu, l0_coefficient: jumprelu) is
    among them, else the default. An explicit `sparsity` option is used as it is instead."""
    variants = list(REGISTRY[arch])
    chosen = [s for s in variants if SIGNATURE.get(s) in given]
    return chosen or variants[:1]


def make_config(arch: str, params: dict[str, Any]) -> Any:
    """The validated Config of `arch` from `params`; unknown names are a UserError."""
    check_arch(arch)
    params = dict(params)
    sparsity = params.get("sparsity")
    if composable(arch) and sparsity is None:
        (sparsity,) = sparsities(arch, set(params))[:1]
        params["sparsity"] = sparsity
    cls = arch_class(arch, sparsity)
    valid = config_fields(cls)
    unknown = sorted(set(params) - valid)
    if unknown:
        fail(f"{', '.join(unknown)} does not apply to arch {arch!r}"
             + (f" with sparsity {sparsity}" if composable(arch) else "")
             + f"; its options are: {', '.join(sorted(valid))}")
    return cls.Config(**params)


def build(arch: str, io: IO, d_sae: int, params: dict[str, Any] | Any, seed: int) -> Dictionary:
    """A freshly initialised dictionary over `io`; `params`: a dict of hyperparameters or the
    arch's Config. The same arguments (seed included) give identical weights."""
    cfg = make_config(arch, params) if isinstance(params, dict) else params
    if isinstance(d_sae, bool) or not isinstance(d_sae, int) or d_sae < 1:
        fail(f"the width must be an integer >= 1 (got {d_sae!r}); pass a positive --width")
    cls = arch_class(arch, getattr(cfg, "sparsity", None))
    check_io(cls, io)
    return cls(io, d_sae, cfg, seed)


def check_io(cls: type[Dictionary], io: IO) -> None:
    """The hooks fit the arch's shape (a CLT checks its layers itself)."""
    if not io.inputs or any(d < 1 for d in io.in_splits + io.out_splits):
        fail(f"{cls.arch} needs input hooks with positive widths, got {list(io.inputs)}")
    hooks = io.in_hooks
    if len(set(hooks)) != len(hooks):
        fail(f"duplicate hook names {hooks}; give each hook a distinct name "
             "(e.g. prefix the model: 'base/blocks.3.hook_resid_post')")
    kind = cls.io_kind
    if kind in ("sae", "crosscoder") and not io.autoencoder:
        fail(f"arch {cls.arch} reconstructs the hooks it reads; --out-hook is for transcoders "
             "and CLTs")
    if kind == "sae" and len(io.inputs) != 1:
        fail(f"arch {cls.arch} reads one hook, got {hooks}")
    if kind == "transcoder" and (len(io.inputs) != 1 or len(io.outputs) != 1):
        fail(f"a transcoder reads one hook and writes one (--hook IN --out-hook OUT), got "
             f"{hooks} -> {io.out_hooks}")


def build_sae(arch: str, d_in: int, d_sae: int, params: dict[str, Any], seed: int) -> Dictionary:
    """A single-hook SAE of width d_sae over d_in (its hook named "x")."""
    if d_in < 1:
        fail(f"d_in must be >= 1 (got {d_in})")
    return build(arch, IO.same({"x": d_in}), d_sae, params, seed)
