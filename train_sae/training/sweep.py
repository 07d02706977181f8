"""Sweep specification: a grid of list-valued options, or a TOML file of explicit members.

Grid rule: for each architecture, each width, and the product of the options that apply to that
architecture. An option that applies to an architecture is one of its own hyperparameters
(`train_sae.dictionaries.arch_params`), an optimizer option (`OPTIM_KEYS`, every arch) or `resample` (relu).
So `--arch topk,relu --k 16,32 --l1 1e-3,5e-3` gives 2 topk and 2 relu members, not 8. An option
that applies to none of the chosen architectures is an error.

TOML (`--config sweep.toml`): an optional `[defaults]` table merged into every `[[member]]` table:

    [defaults]
    lr = 1e-3
    [[member]]
    arch = "topk"
    width = 4096          # or: expansion = 8  (width = expansion x d_in)
    k = 32
    [[member]]
    arch = "relu"
    expansion = 16
    l1_coefficient = 5e-3
    resample = true
    resample_at = [0.5]

Several hooks (`--hook A --hook B` or `--hook all`): the SAE members above are made once per hook,
their folder names prefixed with the hook (`blocks.0.hook_resid_post--topk-w64-k8-lr3e-3`; a `/`
in a hook name becomes `.`), and each crosscoder member (`crosscoder`, `crosscoder_topk`) reads all
the chosen hooks as one input; its `--expansion` is relative to the hooks' summed d_in. One hook
chosen: names carry no prefix.
"""

from __future__ import annotations

import itertools
import re
import typing
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from shared.errors import fail
from train_sae.training.config import (
    CROSSCODER_ARCHS,
    DEFAULT_RESAMPLE_AT,
    OPTIM_KEYS,
    RESAMPLE_ARCHS,
    MemberConfig,
    OptimConfig,
    ResampleConfig,
    default_optim,
    typed,
)

# CLI spelling of hyperparameters, for error messages and member names.
FLAGS = {
    "l1_coefficient": "--l1",
    "l0_coefficient": "--l0",
    "k": "--k",
    "k_aux": "--k-aux",
    "aux_coefficient": "--aux-coefficient",
    "resample": "--resample",
    "lr": "--lr",
    "beta1": "--beta1",
    "beta2": "--beta2",
    "lr_warmup_steps": "--lr-warmup-steps",
    "lr_decay_frac": "--lr-decay-frac",
    "grad_clip": "--grad-clip",
}
SHORT = {
    "l1_coefficient": "l1",
    "l0_coefficient": "l0c",
    "aux_coefficient": "auxc",
    "k_aux": "kaux",
    "lr_warmup_steps": "warm",
    "lr_decay_frac": "decay",
    "grad_clip": "clip",
    "dead_tokens_threshold": "dead",
    "dec_init_norm": "dinit",
    "l1_warmup_fraction": "l1warm",
}
HOOK_SEP = "--"  # between the hook prefix and the member name
NAME_DIGITS = 3  # significant digits of numbers in member names (more only to tell two apart)


@dataclass
class GridSpec:
    """List-valued options as given on the command line (None / empty = not given)."""

    archs: list[str]
    widths: list[int] = field(default_factory=list)
    expansions: list[float] = field(default_factory=list)
    values: dict[str, list[Any]] = field(default_factory=dict)  # hyperparameter -> values
    resample_at: tuple[float, ...] = DEFAULT_RESAMPLE_AT


def flag(key: str) -> str:
    return FLAGS.get(key, f"--param {key}=...")


def known_archs() -> list[str]:
    """Every `--arch` name: the SAE registry, then the crosscoders."""
    from train_sae.dictionaries import REGISTRY
    from train_sae.dictionaries.crosscoder import CROSSCODER_REGISTRY

    assert set(CROSSCODER_REGISTRY) == CROSSCODER_ARCHS, CROSSCODER_REGISTRY
    return sorted(REGISTRY) + sorted(CROSSCODER_REGISTRY)


def arch_param_names(arch: str) -> set[str]:
    """The hyperparameters of an SAE or crosscoder arch (the fields of its Config)."""
    from train_sae.dictionaries import arch_params
    from train_sae.dictionaries.crosscoder import crosscoder_arch_params

    return crosscoder_arch_params(arch) if arch in CROSSCODER_ARCHS else arch_params(arch)


def applies(arch: str, key: str) -> bool:
    if key in OPTIM_KEYS:
        return True
    if key == "resample":
        return arch in RESAMPLE_ARCHS
    return key in arch_param_names(arch)


def check_archs(archs: list[str]) -> None:
    names = known_archs()
    if not archs:
        fail("no architecture given; pass --arch (one of: " + ", ".join(names) + ")")
    for a in archs:
        if a not in names:
            fail(f"unknown architecture {a!r}; choose from: {', '.join(names)}")
    if len(set(archs)) != len(archs):
        fail(f"--arch lists an architecture twice: {','.join(archs)}")


def check_crosscoder_hooks(archs: list[str], hooks: list[str]) -> None:
    """A crosscoder reads several hooks: refuse one with fewer than two."""
    cc = [a for a in archs if a in CROSSCODER_ARCHS]
    if cc and len(hooks) < 2:
        fail(f"--arch {cc[0]} reads several hooks at once but only {', '.join(hooks)} is chosen; "
             "pass two or more --hook options, or --hook all on a store with several hooks")


def hook_prefix(hook: str) -> str:
    """A filesystem-safe folder prefix for a hook: `base/blocks.0.hook_resid_post` ->
    `base.blocks.0.hook_resid_post`; characters outside [A-Za-z0-9._=+-] become `_`."""
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", hook.replace("/", "."))


def resolve_widths(widths: list[int], expansions: list[float], d_in: int) -> list[int]:
    if widths and expansions:
        fail("give either --width or --expansion, not both")
    if expansions:
        out = []
        for e in expansions:
            if not e > 0:
                fail(f"--expansion must be positive, got {e}")
            out.append(int(round(e * d_in)))
        widths = out
    if not widths:
        fail("give the SAE width with --width N or --expansion E (width = E x d_in)")
    for w in widths:
        if w < 1:
            fail(f"--width must be >= 1, got {w}")
    return list(dict.fromkeys(widths))


def expand_grid(spec: GridSpec, dims: dict[str, int], batch_size: int, total_steps: int
                ) -> list[MemberConfig]:
    """Every member of the grid over the chosen hooks `dims` (hook -> d_in, in order): the SAE
    grid for each hook, then the crosscoder grid over all hooks. Within a grid the order is
    stable: arch, width, then options as given."""
    check_archs(spec.archs)
    check_crosscoder_hooks(spec.archs, list(dims))
    for key, vals in spec.values.items():
        if not vals:
            fail(f"{flag(key)} was given an empty list")
        if not any(applies(a, key) for a in spec.archs):
            users = _archs_using(key)
            fail(
                f"{flag(key)} applies to none of the chosen architectures ({', '.join(spec.archs)})"
                + (f"; it is for {', '.join(users)}" if users else "; no architecture has it")
            )
    makers = []
    for hooks, d_in, archs in _groups(spec.archs, dims):
        widths = resolve_widths(spec.widths, spec.expansions, d_in)
        for arch in archs:
            keys = [k for k in spec.values if applies(arch, k)]
            for width in widths:
                for combo in itertools.product(*(spec.values[k] for k in keys)):
                    given = dict(zip(keys, combo, strict=True))
                    makers.append(partial(make_member, arch, width, given, batch_size,
                                          total_steps, spec.resample_at, hooks=hooks,
                                          prefix=len(dims) > 1))
    return make_members(makers)


def _groups(archs: list[str], dims: dict[str, int]
            ) -> list[tuple[tuple[str, ...], int, list[str]]]:
    """(hooks read, input width, archs) per input: each hook for SAEs, all hooks for crosscoders."""
    sae = [a for a in archs if a not in CROSSCODER_ARCHS]
    cc = [a for a in archs if a in CROSSCODER_ARCHS]
    groups = [((h,), d, sae) for h, d in dims.items()] if sae else []
    if cc:
        groups.append((tuple(dims), sum(dims.values()), cc))
    return groups


def make_member(arch: str, d_sae: int, given: dict[str, Any], batch_size: int, total_steps: int,
                resample_at: tuple[float, ...] = DEFAULT_RESAMPLE_AT, *,
                hooks: tuple[str, ...] = (), prefix: bool = False,
                digits: int | None = NAME_DIGITS) -> MemberConfig:
    """One member from explicitly given hyperparameters plus the arch's optimizer defaults.

    hooks: the store hooks it reads (() = the sweep's only hook); prefix: start the name with
    the hook (an SAE in a sweep over several hooks); digits: significant digits of the numbers
    in its name (None: as many as the value needs)."""
    given = dict(given)
    optim = default_optim(arch, d_sae, batch_size, total_steps)
    given_optim = {k: given.pop(k) for k in OPTIM_KEYS if k in given}
    optim.update(given_optim)
    resample = bool(given.pop("resample", arch in RESAMPLE_ARCHS))
    if resample and arch not in RESAMPLE_ARCHS:
        fail(f"resampling applies only to {', '.join(sorted(RESAMPLE_ARCHS))}, not {arch}")
    name = member_name(arch, d_sae, given, optim["lr"], resample if arch in RESAMPLE_ARCHS else None,
                       {k: v for k, v in given_optim.items() if k != "lr"}, digits)
    if prefix and arch not in CROSSCODER_ARCHS:
        assert len(hooks) == 1, hooks
        name = hook_prefix(hooks[0]) + HOOK_SEP + name
    return MemberConfig(
        arch=arch, d_sae=d_sae, params=given,
        optim=OptimConfig(**optim),
        resample=ResampleConfig(enabled=resample, at=tuple(resample_at)),
        name=name, hooks=tuple(hooks),
    )


def member_name(arch: str, d_sae: int, params: dict[str, Any], lr: float, resample: bool | None,
                optim_extra: dict[str, Any], digits: int | None = NAME_DIGITS) -> str:
    """Folder name from the given hyperparameters, e.g. `topk-w4096-k32-lr2e-4`."""
    parts = [arch, f"w{d_sae}"]
    parts += [f"{SHORT.get(k, k)}{fmt(v, digits)}" for k, v in sorted(params.items())]
    parts.append(f"lr{fmt(lr, digits)}")
    parts += [f"{SHORT.get(k, k)}{fmt(v, digits)}" for k, v in sorted(optim_extra.items())]
    if resample is not None:
        parts.append("rs" if resample else "nors")
    return "-".join(parts)


def fmt(v: Any, digits: int | None = NAME_DIGITS) -> str:
    """Compact, filename-safe number formatting with at most `digits` significant digits
    (None: the fewest that give back the exact float): 2e-4, 0.005 -> 5e-3, 5.3333e-4 -> 5.33e-4,
    32, 1.5."""
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if digits is None:
            digits = max(NAME_DIGITS, next(d for d in range(1, 18) if float(f"{v:.{d}g}") == v))
        short = f"{v:.{digits}g}"
        if v != 0 and (abs(v) < 1e-2 or "e" in short):
            mant, exp = f"{v:.{digits - 1}e}".split("e")
            mant = mant.rstrip("0").rstrip(".") if "." in mant else mant
            return f"{mant}e{int(exp)}"
        return short
    return str(v).replace("/", "_")


def make_members(makers: list[Callable[..., MemberConfig]]) -> list[MemberConfig]:
    """Members from `make_member` calls (each with its arguments bound): names with NAME_DIGITS
    significant digits, except that members whose short names collide are named at full
    precision; members still named alike are the same member twice, an error."""
    members = [make() for make in makers]
    count = Counter(m.name for m in members)
    members = [make(digits=None) if count[m.name] > 1 else m
               for m, make in zip(members, makers, strict=True)]
    check_unique(members)
    return members


def check_unique(members: list[MemberConfig]) -> None:
    seen: set[str] = set()
    for m in members:
        if m.name in seen:
            fail(f"two sweep members would both be named {m.name!r}; remove the duplicate")
        seen.add(m.name)


def _archs_using(key: str) -> list[str]:
    return [a for a in known_archs() if key in arch_param_names(a)
            or (key == "resample" and a in RESAMPLE_ARCHS)]


def parse_list(text: str, what: str, kind: type | None = None) -> list[Any]:
    """`16,32` -> [16, 32]; `1e-3,5e-3` -> floats; `on,off` -> [True, False]. `kind` (int,
    float, bool or str): every item must be one, or a UserError names `what` and the item."""
    out = []
    for raw in text.split(","):
        s = raw.strip()
        if not s:
            fail(f"{what} has an empty item in {text!r}; separate values with single commas")
        value = s if kind is str else parse_value(s)
        out.append(value if kind is None else typed(value, kind, what))
    return out


def parse_value(s: str) -> Any:
    low = s.lower()
    if low in ("on", "true", "yes"):
        return True
    if low in ("off", "false", "no"):
        return False
    try:
        return int(s)
    except ValueError:
        pass
    try:
        return float(s)
    except ValueError:
        return s


def option_type(key: str) -> type | None:
    """The type (int, float or bool) of hyperparameter `key`: the type of that field in
    OptimConfig or in the Config of an architecture that has it; None if none has it."""
    from train_sae.dictionaries import REGISTRY
    from train_sae.dictionaries.crosscoder import CROSSCODER_REGISTRY

    if key == "resample":
        return bool
    archs = (*REGISTRY.values(), *CROSSCODER_REGISTRY.values())
    for cls in (OptimConfig, *(a.Config for a in archs)):
        hint = typing.get_type_hints(cls).get(key)
        if hint is not None:  # `int | None` (k_aux) -> int
            return next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))
    return None


# types of the TOML member keys that are not hyperparameters (resample_at: see _toml_value)
_TOML_TYPES = {"arch": str, "width": int, "expansion": float}


def _toml_value(key: str, value: Any, where: str) -> Any:
    """One value of a TOML member table, typed like the option it stands for."""
    what = f"{where}: {key!r}"
    if key == "resample_at":
        if not isinstance(value, list):
            fail(f"{what} takes a list of fractions, got {value!r}; write e.g. [0.5]")
        return tuple(typed(v, float, what) for v in value)
    kind = _TOML_TYPES.get(key) or option_type(key)
    return value if kind is None else typed(value, kind, what)


def load_toml(path: str | Path, dims: dict[str, int], batch_size: int, total_steps: int
              ) -> list[MemberConfig]:
    """Members listed in a sweep TOML file (format in the module docstring), for the chosen
    hooks `dims` (hook -> d_in): an SAE table gives one member per hook, a crosscoder table one
    member over all of them."""
    import tomllib

    p = Path(path)
    if not p.is_file():
        fail(f"sweep config {p} does not exist; pass an existing TOML file to --config")
    try:
        doc = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        fail(f"sweep config {p} is not valid TOML ({e}); fix the file")
    unknown = set(doc) - {"defaults", "member"}
    if unknown:
        fail(f"sweep config {p} has unknown table(s) {sorted(unknown)}; use [defaults] and [[member]]")
    defaults = doc.get("defaults", {})
    tables = doc.get("member", [])
    if not isinstance(defaults, dict):
        fail(f"sweep config {p}: 'defaults' must be a table; write it as [defaults]")
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        fail(f"sweep config {p}: 'member' must be a list of tables; write each as [[member]]")
    if not tables:
        fail(f"sweep config {p} lists no [[member]] tables; add at least one")
    makers = []
    for i, table in enumerate(tables):
        where = f"{p} member {i + 1}"
        t = {k: _toml_value(k, v, where) for k, v in {**defaults, **table}.items()}
        arch = t.pop("arch", None)
        if arch is None:
            fail(f"{where} has no arch; add e.g. arch = \"topk\"")
        check_archs([arch])
        check_crosscoder_hooks([arch], list(dims))
        width = t.pop("width", None)
        expansion = t.pop("expansion", None)
        resample_at = t.pop("resample_at", DEFAULT_RESAMPLE_AT)
        for key in t:
            if not applies(arch, key):
                fail(f"{where}: {key!r} does not apply to arch {arch!r}; remove it")
        for hooks, d_in, _ in _groups([arch], dims):
            (d_sae,) = resolve_widths([width] if width is not None else [],
                                      [expansion] if expansion is not None else [], d_in)
            makers.append(partial(make_member, arch, d_sae, t, batch_size, total_steps,
                                  resample_at, hooks=hooks, prefix=len(dims) > 1))
    return make_members(makers)
