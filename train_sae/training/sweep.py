"""Sweep specification: a grid of list-valued options, or a TOML file of explicit members.

Grid rule: for each architecture, each width, and the product of the options that apply to that
architecture. An option that applies to an architecture is one of its own hyperparameters
(`train_sae.dictionaries.arch_params`), an optimizer option (`OPTIM_KEYS`, every arch) or
`resample` (architectures that resample). So `--arch topk,relu --k 16,32 --l1 1e-3,5e-3` gives 2
topk and 2 relu members, not 8. An option that applies to none of the chosen architectures is an
error. A transcoder or CLT comes in several sparsities: `--sparsity topk,relu` names them; without
it the options given choose (`--k`: topk, `--l1`: relu, `--l0`: jumprelu; none: topk), so
`--arch transcoder --k 32 --l1 5` is a TopK and a ReLU transcoder.

TOML (`--config sweep.toml`): an optional `[defaults]` table merged into every `[[member]]` table:

    [defaults]
    lr = 1e-3
    [[member]]
    arch = "topk"
    width = 4096          # or: expansion = 8  (width = expansion x d_in)
    k = 32
    [[member]]
    arch = "matryoshka_batchtopk"
    width = 16384
    matryoshka_widths = [1024, 4096, 16384]    # cumulative, ending at the width
    [[member]]
    arch = "relu"
    expansion = 16
    l1_coefficient = 5e-3
    resample = true
    resample_at = [0.5]

Which hooks each member reads (`--hook A --hook B`, or `--hook all`) and predicts (`--out-hook`):
- an SAE member is made once per --hook, its folder name prefixed with the hook when there are
  several (`blocks.0.hook_resid_post--topk-w64-k8-lr3e-3`; a `/` in a hook name becomes `.`);
- a crosscoder member reads all the --hook hooks as one input; its `--expansion` is relative to
  their summed d_in;
- a transcoder member is made once per (--hook, --out-hook) pair, the i-th of each;
- a CLT member reads every --hook (one per layer) and predicts every --out-hook.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from shared.errors import fail
from train_sae.dictionaries import (
    REGISTRY,
    arch_class,
    arch_params,
    check_arch,
    composable,
    io_kind,
    make_config,
    sparsities,
)
from train_sae.params import PARAMS, parse_scalar, typed
from train_sae.training.config import (
    DEFAULT_RESAMPLE_AT,
    OPTIM_KEYS,
    MemberConfig,
    OptimConfig,
    ResampleConfig,
)

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
    p = PARAMS.get(key)
    return p.label if p is not None else f"--param {key}"


def known_archs() -> list[str]:
    """Every `--arch` name, in registry order."""
    return list(REGISTRY)


def resamples(arch: str) -> bool:
    return arch_class(arch).resamples


def applies(arch: str, key: str, sparsity: str | None = None) -> bool:
    """Whether option `key` applies to `arch` (with that sparsity, if given)."""
    if key in OPTIM_KEYS:
        return True
    if key == "resample":
        return resamples(arch)
    return key in arch_params(arch, sparsity)


def check_archs(archs: list[str]) -> None:
    if not archs:
        fail("no architecture given; pass --arch (one of: " + ", ".join(known_archs()) + ")")
    for a in archs:
        if a not in REGISTRY:
            fail(f"unknown architecture {a!r}; choose from: {', '.join(known_archs())}")
    if len(set(archs)) != len(archs):
        fail(f"--arch lists an architecture twice: {','.join(archs)}")


def check_hooks(archs: list[str], inputs: list[str], outputs: list[str]) -> None:
    """The chosen hooks fit the chosen architectures (one line, exit 2, when not)."""
    kinds = {a: io_kind(a) for a in archs}
    cc = [a for a, k in kinds.items() if k == "crosscoder"]
    if cc and len(inputs) < 2:
        fail(f"--arch {cc[0]} reads several hooks at once but only {', '.join(inputs)} is chosen; "
             "pass two or more --hook options, or --hook all on a store with several hooks")
    mapping = [a for a, k in kinds.items() if k in ("transcoder", "clt")]
    if outputs and not mapping:
        fail(f"--out-hook is for architectures that predict other hooks (transcoder, "
             f"skip_transcoder, clt); {', '.join(archs)} reconstruct their --hook; drop "
             "--out-hook or add one of those")
    if mapping and not outputs:
        fail(f"--arch {mapping[0]} predicts other hooks than it reads: give --out-hook OUT, one "
             "per --hook (e.g. --hook blocks.0.ln2.hook_normalized --out-hook "
             "blocks.0.hook_mlp_out)")
    if mapping and len(outputs) != len(inputs):
        fail(f"--arch {mapping[0]} pairs the i-th --hook with the i-th --out-hook, but "
             f"{len(inputs)} --hook and {len(outputs)} --out-hook are given; give them the "
             "same number of times, in the same order")


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


@dataclass(frozen=True)
class Group:
    """Members that read the same hooks: their hooks, the d_in an --expansion multiplies, the
    archs, and whether member names carry the input hook (several groups of one kind)."""

    hooks: tuple[str, ...]
    out_hooks: tuple[str, ...]
    d_in: int
    archs: list[str]
    prefix: bool


def groups(archs: list[str], inputs: dict[str, int], outputs: dict[str, int]) -> list[Group]:
    """Per input: each --hook for SAEs, all --hook for crosscoders, each (--hook, --out-hook)
    pair for transcoders, all of both for CLTs."""
    check_hooks(archs, list(inputs), list(outputs))
    by_kind: dict[str, list[str]] = {}
    for a in archs:
        by_kind.setdefault(io_kind(a), []).append(a)
    several = len(inputs) > 1
    out: list[Group] = []
    if "sae" in by_kind:
        out += [Group((h,), (), d, by_kind["sae"], several) for h, d in inputs.items()]
    if "crosscoder" in by_kind:
        out.append(Group(tuple(inputs), (), sum(inputs.values()), by_kind["crosscoder"], False))
    if "transcoder" in by_kind:
        out += [Group((h,), (o,), inputs[h], by_kind["transcoder"], several)
                for h, o in zip(inputs, outputs, strict=True)]
    if "clt" in by_kind:
        out.append(Group(tuple(inputs), tuple(outputs), sum(inputs.values()), by_kind["clt"],
                         False))
    return out


def variants(arch: str, values: dict[str, list[Any]]) -> list[str | None]:
    """The sparsities of `arch` a grid makes (None: an arch of one sparsity)."""
    if not composable(arch):
        return [None]
    if "sparsity" in values:
        given = list(dict.fromkeys(values["sparsity"]))
        for s in given:
            arch_class(arch, s)  # a sparsity the arch has
        return given
    return list(sparsities(arch, set(values)))


def expand_grid(spec: GridSpec, inputs: dict[str, int], batch_size: int, total_steps: int,
                outputs: dict[str, int] | None = None) -> list[MemberConfig]:
    """Every member of the grid over the chosen hooks `inputs` (hook -> d_in, in order) and
    output hooks `outputs` (--out-hook: hook -> width): SAE members per hook, then crosscoders,
    transcoders and CLTs (`groups`). Within a group the order is stable: arch, sparsity, width,
    then options as given."""
    check_archs(spec.archs)
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
    used = {"sparsity"}
    for g in groups(spec.archs, inputs, outputs or {}):
        widths = resolve_widths(spec.widths, spec.expansions, g.d_in)
        for arch in g.archs:
            for sparsity in variants(arch, spec.values):
                keys = [k for k in spec.values if k != "sparsity" and applies(arch, k, sparsity)]
                used.update(keys)
                fixed = {} if sparsity is None else {"sparsity": sparsity}
                for width in widths:
                    for combo in itertools.product(*(spec.values[k] for k in keys)):
                        given = {**fixed, **dict(zip(keys, combo, strict=True))}
                        makers.append(partial(make_member, arch, width, given, batch_size,
                                              total_steps, spec.resample_at, hooks=g.hooks,
                                              out_hooks=g.out_hooks, prefix=g.prefix))
    unused = [k for k in spec.values if k not in used]
    if unused:  # e.g. --sparsity relu --k 4: k is an option of the topk sparsity only
        fail(f"{flag(unused[0])} applies to none of the chosen architectures with the chosen "
             f"sparsities ({', '.join(spec.archs)}; --sparsity "
             f"{','.join(map(str, spec.values.get('sparsity', ['from the options'])))}); "
             "drop it or add a sparsity that takes it")
    return make_members(makers)


def make_member(arch: str, d_sae: int, given: dict[str, Any], batch_size: int, total_steps: int,
                resample_at: tuple[float, ...] = DEFAULT_RESAMPLE_AT, *,
                hooks: tuple[str, ...] = (), out_hooks: tuple[str, ...] = (),
                prefix: bool = False, digits: int | None = NAME_DIGITS) -> MemberConfig:
    """One member from explicitly given hyperparameters plus the arch's optimizer defaults.

    hooks / out_hooks: the store hooks it reads / predicts (() = the sweep's only hook / the
    hooks it reads); prefix: start the name with its (first) input hook; digits: significant
    digits of the numbers in its name (None: as many as the value needs)."""
    given = dict(given)
    given_optim = {k: given.pop(k) for k in OPTIM_KEYS if k in given}
    resample = given.pop("resample", None)
    check_arch(arch)
    if resample and not resamples(arch):
        fail(f"resampling applies only to {', '.join(_archs_using('resample'))}, not {arch}")
    resample = bool(resample if resample is not None else resamples(arch))
    params = make_config(arch, given)  # typed and checked; picks a composable arch's sparsity
    sparsity = getattr(params, "sparsity", None)
    optim = arch_class(arch, sparsity).optim_defaults(d_sae, batch_size, total_steps)
    optim.update(given_optim)
    label = arch if sparsity is None else f"{arch}.{sparsity}"
    named = {k: v for k, v in given.items() if k != "sparsity"}
    name = member_name(label, d_sae, named, optim["lr"], resample if resamples(arch) else None,
                       {k: v for k, v in given_optim.items() if k != "lr"}, digits)
    if prefix:
        name = hook_prefix(hooks[0]) + HOOK_SEP + name
    return MemberConfig(
        arch=arch, d_sae=d_sae, params=params,
        optim=OptimConfig(**optim),
        resample=ResampleConfig(enabled=resample, at=tuple(resample_at)),
        name=name, hooks=tuple(hooks), out_hooks=tuple(out_hooks),
    )


def member_name(arch: str, d_sae: int, params: dict[str, Any], lr: float, resample: bool | None,
                optim_extra: dict[str, Any], digits: int | None = NAME_DIGITS) -> str:
    """Folder name from the given hyperparameters, e.g. `topk-w4096-k32-lr2e-4`."""
    parts = [arch, f"w{d_sae}"]
    parts += [f"{_short(k)}{fmt(v, digits)}" for k, v in sorted(params.items())]
    parts.append(f"lr{fmt(lr, digits)}")
    parts += [f"{_short(k)}{fmt(v, digits)}" for k, v in sorted(optim_extra.items())]
    if resample is not None:
        parts.append("rs" if resample else "nors")
    return "-".join(parts)


def _short(key: str) -> str:
    p = PARAMS.get(key)
    return (p.short or p.name) if p is not None else key


def fmt(v: Any, digits: int | None = NAME_DIGITS) -> str:
    """Compact, filename-safe number formatting with at most `digits` significant digits
    (None: the fewest that give back the exact float): 2e-4, 0.005 -> 5e-3, 5.3333e-4 -> 5.33e-4,
    32, 1.5."""
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, tuple | list):
        return "+".join(fmt(x, digits) for x in v)
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
    return [a for a in known_archs() if applies(a, key)]


def parse_list(text: str, what: str, kind: type | None = None) -> list[Any]:
    """`16,32` -> [16, 32]; `1e-3,5e-3` -> floats; `on,off` -> [True, False]. `kind` (int,
    float, bool or str): every item must be one, or a UserError names `what` and the item."""
    out = []
    for raw in text.split(","):
        s = raw.strip()
        if not s:
            fail(f"{what} has an empty item in {text!r}; separate values with single commas")
        value = parse_scalar(s, kind)
        out.append(value if kind is None else typed(value, kind, what))
    return out


def parse_values(key: str, text: str) -> list[Any]:
    """The comma-separated values of hyperparameter `key` as given on the command line, each
    typed and checked by its declaration (train_sae/params.py)."""
    p = PARAMS.get(key)
    if p is None:
        fail(f"unknown hyperparameter {key!r} in --param; the hyperparameters are "
             f"{', '.join(sorted(PARAMS))}")
    items = [raw.strip() for raw in text.split(",")]
    if any(not s for s in items):
        fail(f"{p.label} has an empty item in {text!r}; separate values with single commas")
    return [p.parse(s) for s in items]


# types of the TOML member keys that are not hyperparameters (resample_at: see _toml_value)
_TOML_TYPES = {"arch": str, "width": int, "expansion": float}


def _toml_value(key: str, value: Any, where: str) -> Any:
    """One value of a TOML member table, typed like the option it stands for."""
    what = f"{where}: {key!r}"
    if key == "resample_at":
        if not isinstance(value, list):
            fail(f"{what} takes a list of fractions, got {value!r}; write e.g. [0.5]")
        return tuple(typed(v, float, what) for v in value)
    if key in _TOML_TYPES:
        return typed(value, _TOML_TYPES[key], what)
    if key in PARAMS:
        if PARAMS[key].many and not isinstance(value, list):
            fail(f"{what} takes an array, got {value!r}; write e.g. [1024, 4096, 16384]")
        return PARAMS[key].check(value, what)
    return value


def load_toml(path: str | Path, inputs: dict[str, int], batch_size: int, total_steps: int,
              outputs: dict[str, int] | None = None) -> list[MemberConfig]:
    """Members listed in a sweep TOML file (format in the module docstring), for the chosen
    hooks `inputs` (hook -> d_in) and `outputs` (--out-hook): an SAE table gives one member per
    hook, a transcoder table one per pair, a crosscoder or CLT table one over all of them."""
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
        width = t.pop("width", None)
        expansion = t.pop("expansion", None)
        resample_at = t.pop("resample_at", DEFAULT_RESAMPLE_AT)
        for key in t:
            if not applies(arch, key):
                fail(f"{where}: {key!r} does not apply to arch {arch!r}; remove it")
        for g in groups([arch], inputs, outputs or {}):
            (d_sae,) = resolve_widths([width] if width is not None else [],
                                      [expansion] if expansion is not None else [], g.d_in)
            makers.append(partial(make_member, arch, d_sae, t, batch_size, total_steps,
                                  resample_at, hooks=g.hooks, out_hooks=g.out_hooks,
                                  prefix=g.prefix))
    return make_members(makers)
