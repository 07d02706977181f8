"""Which models a run caches, under which names, and the check that they share a tokenizer.

`--model [TAG=]SPEC` may be repeated to cache several models over the same tokens (model diffing:
a crosscoder on base vs chat). Stored names:
- one untagged --model (or none: the embedded default): hooks keep their own names,
  `acts/blocks.3.hook_resid_post`, exactly as a single-model store always had;
- otherwise every model has a tag (its own, or `m0`, `m1`, ... by position) and each of its hooks
  is stored as `<tag>/<hook>`: `acts/base/blocks.3.hook_resid_post`.
A plain `--hook HOOK` is taken from every model; `--hook TAG/HOOK` from that model only.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from shared.errors import UserError, fail
from shared.tokens import TokenSpec, iter_token_batches

if TYPE_CHECKING:  # shared.models imports transformer_lens (seconds); `import` needs only the check
    from shared.models import LoadedModel

_TAGGED = re.compile(r"([A-Za-z][A-Za-z0-9_-]*)=(.+)")
_SAMPLE_SEQUENCES = 16  # packed sequences tokenized by every model to compare their tokenizers


@dataclass(frozen=True)
class ModelChoice:
    """One model of a run and the hook points taken from it."""

    tag: str | None  # None: the single untagged model, whose hooks keep their own names
    spec: str | None  # a `shared.models.load_model` spec; None: the embedded default
    hooks: tuple[str, ...]  # hook points of this model, as the model names them

    def stored(self, hook: str) -> str:
        """The name `hook` of this model has in the store (manifest hooks, `acts/<name>`)."""
        return hook if self.tag is None else f"{self.tag}/{hook}"

    @contextlib.contextmanager
    def named_in_errors(self) -> Iterator[None]:
        """Say which model a UserError raised inside is about (tagged models only)."""
        try:
            yield
        except UserError as e:
            if self.tag is None:
                raise
            raise UserError(f"model {self.tag}: {e}") from None


def check_hook_name(hook: str, option: str = "--hook") -> None:
    """Refuse (UserError) a hook name that cannot name a store array `acts/<hook>` safely: Zarr
    v3 names are separated by '/', each non-empty, not all periods and not starting with '__';
    a backslash or a control character would be an unsafe path on some systems."""
    parts = hook.split("/")
    if not hook:
        why = "it is empty"
    elif "" in parts:
        why = "it has a leading, trailing or double '/'"
    elif any(set(p) == {"."} for p in parts):
        why = "'.' and '..' are not names"
    elif any(p.startswith("__") for p in parts):
        why = "names starting with '__' are reserved by Zarr"
    elif any(c == "\\" or not c.isprintable() for c in hook):
        why = "it holds a backslash or a control character"
    else:
        return
    fail(f"{option} {hook!r} cannot name a stored array ({why}); give a hook name such as "
         "blocks.0.hook_resid_post")


def parse_models(models: list[str], hooks: list[str]) -> list[ModelChoice]:
    """`--model` values ([] = the embedded default) and `--hook` values -> one choice per model."""
    for hook in hooks:
        check_hook_name(hook)
    if not models:
        if hooks:
            return [ModelChoice(None, None, tuple(hooks))]
        from shared.embedded import DEFAULT_HOOK

        return [ModelChoice(None, None, (DEFAULT_HOOK,))]
    if not hooks:
        fail("--hook is required with --model; name one or more hook points, "
             "e.g. --hook blocks.0.hook_resid_post")
    pairs = [_split_tag(text, i, several=len(models) > 1) for i, text in enumerate(models)]
    tags = [tag for tag, _ in pairs]
    for tag in tags:
        if tag is not None and tags.count(tag) > 1:
            fail(f"model tag {tag!r} is used twice; give each --model its own TAG=")
    if tags == [None]:
        if any("/" in h for h in hooks):
            bad = next(h for h in hooks if "/" in h)
            fail(f"--hook {bad} picks a model by tag, but the one --model has no tag; "
                 f"write --model TAG=SPEC or drop the prefix")
        return [ModelChoice(None, models[0], tuple(hooks))]
    per_model: dict[str, list[str]] = {tag: [] for tag in tags}
    for h in hooks:
        tag, sep, name = h.partition("/")
        if not sep:
            for hs in per_model.values():
                hs.append(h)
        elif tag in per_model:
            per_model[tag].append(name)
        else:
            fail(f"--hook {h}: no --model is tagged {tag!r} (tags: {', '.join(per_model)}); "
                 "use TAG/HOOK with one of them, or a plain HOOK for every model")
    for tag, hs in per_model.items():
        if not hs:
            fail(f"model {tag} has no hook; add --hook HOOK (every model) or --hook {tag}/HOOK")
    return [ModelChoice(tag, spec, tuple(per_model[tag])) for tag, spec in pairs]


def _split_tag(text: str, index: int, several: bool) -> tuple[str | None, str]:
    """'base=gpt2' -> ('base', 'gpt2'); an untagged spec gets m<index> when there are several."""
    m = _TAGGED.fullmatch(text)
    if m:
        return m.group(1), m.group(2)
    if text.startswith("=") or text.endswith("="):
        fail(f"--model {text!r} is not TAG=SPEC; write e.g. --model base=gpt2")
    return (f"m{index}" if several else None), text


def model_label(choices: list[ModelChoice], specs: list[str]) -> str:
    """The manifest's `model` string: the canonical spec, or 'base=<spec>,chat=<spec>'."""
    if len(choices) == 1 and choices[0].tag is None:
        return specs[0]
    return ",".join(f"{c.tag}={s}" for c, s in zip(choices, specs, strict=True))


def check_shared_tokenizer(choices: list[ModelChoice], loaded: list[LoadedModel],
                           spec: TokenSpec) -> None:
    """Raise UserError unless every model reads the same token ids: the same d_vocab, and the same
    packed sequences (tokens and cached positions) for a sample of the data, or no tokenizer at
    all with pre-tokenized data. The rows are then made once, with the first model's tokenizer."""
    first, ref = choices[0], loaded[0]
    for c, lm in zip(choices[1:], loaded[1:], strict=True):
        a, b = ref.model.cfg.d_vocab, lm.model.cfg.d_vocab
        if a != b:
            fail(f"models {first.tag} (d_vocab {a}) and {c.tag} (d_vocab {b}) have different "
                 "vocabularies; model diffing needs models that share a tokenizer")
        if (ref.tokenizer is None) != (lm.tokenizer is None):
            has, lacks = (first.tag, c.tag) if lm.tokenizer is None else (c.tag, first.tag)
            fail(f"model {has} has a tokenizer but {lacks} has none; give both the same "
                 "tokenizer, or neither and pass pre-tokenized data with --token-column")
    if ref.tokenizer is None or len(loaded) == 1:
        return  # pre-tokenized ids go to every model as they are
    want = _sample(spec, ref)
    for c, lm in zip(choices[1:], loaded[1:], strict=True):
        if not _same(want, _sample(spec, lm)):
            fail(f"models {first.tag} and {c.tag} tokenize the data differently (compared on "
                 f"its first {_SAMPLE_SEQUENCES} sequences); model diffing needs models that "
                 "share a tokenizer")


def _sample(spec: TokenSpec, lm: LoadedModel) -> list[torch.Tensor]:
    """[tokens, keep] of the first sequences of the source as this model's tokenizer packs them."""
    batches = list(iter_token_batches(spec, lm.tokenizer, _SAMPLE_SEQUENCES,
                                      max_sequences=_SAMPLE_SEQUENCES))
    return [batches[0].tokens, batches[0].keep] if batches else []


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and bool((x == y).all())
                                    for x, y in zip(a, b, strict=True))
