"""Every hyperparameter of `train-sae`, declared once: its name, type, bounds, help text, CLI flag
and short name in member folder names.

Which architectures take a hyperparameter is not written here: it is whichever dictionaries'
`Config` dataclasses have a field of that name (`train_sae.dictionaries.arch_params`), each with
its own default (an L1 coefficient of 5 suits a ReLU SAE, 2 a crosscoder). Everything else is
derived from this table: the `train-sae sweep/run` options (one per entry with a `flag`; every
entry also as `--param NAME=...`), the typing of TOML sweep files and grid values, the checks in
each `Config.__post_init__`, and member names.

List-valued hyperparameters (`matryoshka_widths`) are written with `+` between the items on the
command line (`--matryoshka-widths 1024+4096+16384`), so that commas still separate the values
of a sweep (`--matryoshka-widths 64+256,128+256` is two members); in TOML they are arrays.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from shared.errors import fail
from shared.units import parse_count

LIST_SEP = "+"  # between the items of one list value on the command line


@dataclass(frozen=True)
class Param:
    name: str
    kind: type  # int, float, bool or str; of each item when `many`
    help: str
    flag: str | None = None  # the CLI option (without --); None: only --param NAME=...
    short: str | None = None  # in member names (default: the name)
    low: float | None = None  # smallest allowed value
    low_open: bool = False  # the bound itself is not allowed
    high: float | None = None
    high_open: bool = False
    choices: tuple[str, ...] = ()
    optional: bool = False  # None is a value (meaning: the architecture's own default)
    many: bool = False  # a list of `kind` (e.g. matryoshka_widths)

    @property
    def label(self) -> str:
        """How messages name it: its flag, or `--param NAME`."""
        return f"--{self.flag}" if self.flag else f"--param {self.name}"

    def check(self, value: Any, what: str | None = None) -> Any:
        """`value` typed and within bounds, or a UserError naming `what` (default: the option)
        and what it takes."""
        what = what or self.label
        if value is None and self.optional:
            return None
        if self.many:
            if not isinstance(value, list | tuple) or not value:
                fail(f"{what} takes a list of {_KINDS[self.kind][0]}, got {value!r}; write e.g. "
                     f"{LIST_SEP.join([_KINDS[self.kind][1]] * 2)} (TOML: an array)")
            return tuple(self._one(v, what) for v in value)
        return self._one(value, what)

    def _one(self, value: Any, what: str) -> Any:
        value = typed(value, self.kind, what)
        if self.choices and value not in self.choices:
            fail(f"{what} must be one of {', '.join(self.choices)} (got {value!r})")
        if self.kind in (int, float):
            too_low = self.low is not None and (value < self.low or
                                                (self.low_open and value == self.low))
            too_high = self.high is not None and (value > self.high or
                                                  (self.high_open and value == self.high))
            if too_low or too_high:
                fail(f"{what} must be {self.bounds()} (got {value})")
        return value

    def bounds(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return " and ".join(parts)

    def parse(self, text: str) -> Any:
        """One value as written on the command line (a list value: items joined by `+`)."""
        if self.many:
            items = text.split(LIST_SEP)
            if any(not s.strip() for s in items):
                fail(f"{self.label} has an empty item in {text!r}; join the items of one list "
                     f"with single {LIST_SEP!r}")
            return self.check([self._parse_one(s.strip()) for s in items])
        return self.check(self._parse_one(text))

    def _parse_one(self, text: str) -> Any:
        if self.kind is int and text[-1:].isalpha():  # a count with a unit: 10M, 200k
            return parse_count(text)
        return parse_scalar(text, self.kind)


def parse_scalar(text: str, kind: type | None = None) -> Any:
    """A command-line word as a bool (on/off, true/false, yes/no), int, float or string."""
    if kind is str:
        return text
    low = text.lower()
    if low in ("on", "true", "yes"):
        return True
    if low in ("off", "false", "no"):
        return False
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


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


SPARSITIES = ("topk", "batchtopk", "relu", "jumprelu")

PARAMS: dict[str, Param] = {p.name: p for p in (
    # --- the optimizer and its schedule (every architecture) ---
    Param("lr", float, "learning rate (default per arch)", flag="lr", low=0, low_open=True),
    Param("beta1", float, "Adam beta1 (default 0.9)", flag="beta1", low=0, high=1,
          high_open=True),
    Param("beta2", float, "Adam beta2 (default 0.999)", flag="beta2", low=0, high=1,
          high_open=True),
    Param("lr_warmup_steps", int, "LR warm-up steps from lr/10 (also after each resampling)",
          flag="lr-warmup-steps", short="warm", low=0),
    Param("lr_decay_frac", float, "fraction of final steps over which the LR decays linearly "
          "to 0", flag="lr-decay-frac", short="decay", low=0, high=1),
    Param("grad_clip", float, "max gradient norm (0: off)", flag="grad-clip", short="clip", low=0),
    Param("resample", bool, "Anthropic resampling of dead latents: on,off (default on)",
          flag="resample"),
    # --- sparsity ---
    Param("sparsity", str, "how a transcoder or CLT picks its active latents: topk, batchtopk, "
          "relu (L1) or jumprelu (L0); default: from the options given (--k: topk, --l1: relu, "
          "--l0: jumprelu), else topk", flag="sparsity", choices=SPARSITIES),
    Param("k", int, "latents active per token", flag="k", low=1),
    Param("k_aux", int, "dead latents used by the AuxK loss (default d_out / 2, Gao et al.)",
          flag="k-aux", short="kaux", low=1, optional=True),
    Param("aux_coefficient", float, "weight of the AuxK loss (Gao et al.: 1/32)",
          flag="aux-coefficient", short="auxc", low=0),
    Param("dead_tokens_threshold", int, "a latent that has not fired for this many tokens is "
          "dead (Gao et al.: 10M)", short="dead", low=1),
    Param("aux_normalize", bool, "divide the AuxK loss by the residual's variance (Gao et al.) "
          "instead of SAELens' plain mean"),
    Param("threshold_ema", float, "rate of the moving average of the smallest kept activation "
          "(BatchTopK's inference threshold)", low=0, high=1),
    Param("l1_coefficient", float, "weight of the L1 penalty on latent activations", flag="l1",
          short="l1", low=0),
    Param("l1_warmup_fraction", float, "fraction of the steps over which the L1 weight rises "
          "linearly from 0", short="l1warm", low=0, high=1, high_open=True),
    Param("l0_coefficient", float, "weight of the (straight-through) L0 penalty", flag="l0",
          short="l0c", low=0),
    Param("bandwidth", float, "width of the rectangle kernel of JumpReLU's threshold "
          "pseudo-derivative", low=0, low_open=True),
    Param("init_threshold", float, "initial JumpReLU threshold of every latent", low=0,
          low_open=True),
    # --- shape ---
    Param("dec_init_norm", float, "norm of each latent's decoder vector at init (flattened over "
          "the hooks it writes)", short="dinit", low=0, low_open=True),
    Param("matryoshka_widths", int, "cumulative widths of the nested prefixes, ending at the "
          "width, e.g. 1024+4096+16384 (default: a quarter, a half, all)", flag="matryoshka-widths",
          short="mw", low=1, many=True, optional=True),
)}


def param(name: str) -> Param:
    if name not in PARAMS:
        fail(f"unknown hyperparameter {name!r}; the hyperparameters are "
             f"{', '.join(sorted(PARAMS))}")
    return PARAMS[name]


def fmt_value(value: Any) -> Any:
    """A hyperparameter value as JSON stores it (tuples as lists)."""
    return list(value) if isinstance(value, tuple) else value


class HyperParams:
    """Base of every dictionary's `Config` dataclass: each field must be declared in PARAMS and
    is checked (typed, bounds) against its declaration after init."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            setattr(self, f.name, param(f.name).check(getattr(self, f.name)))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: fmt_value(getattr(self, f.name))
                for f in dataclasses.fields(self)}  # type: ignore[arg-type]
