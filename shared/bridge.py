"""The TransformerBridge backend: any Hugging Face causal LM, in TransformerLens 3.9 and 4.x.

`TransformerBridge.boot_transformers` wraps the Hugging Face model itself (its own weights, no
LayerNorm folding or weight centering), so the activations at a hook are the Hugging Face
model's own: `blocks.L.hook_out` (alias `blocks.L.hook_resid_post`) is `hidden_states[L + 1]` of
`output_hidden_states=True` for every block but the last (whose hidden state Hugging Face gives
after the final norm: `ln_final.hook_out`). Hook names are the bridge's; it also answers to the
HookedTransformer names it lists as aliases (`hook_resid_pre/mid/post`, `hook_mlp_out`, ...).

Only shared.models calls this module; it loads, checks the input and describes the model.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
from pathlib import Path
from typing import Any

import torch

from shared.errors import fail, first_line
from shared.fingerprint import digest_of, files_fingerprint, folder_files
from shared.hf_tokenizer import load_tokenizer

BACKEND = "bridge"


def tl_version() -> str:
    return importlib.metadata.version("transformer-lens")


def is_bridge(model: Any) -> bool:
    from transformer_lens.model_bridge import TransformerBridge

    return isinstance(model, TransformerBridge)


@contextlib.contextmanager
def _quiet_hf():
    """No "Loading weights" progress bars from transformers while the bridge boots."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _causal_lm_classes() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def _supported_architectures() -> list[str]:
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    return sorted(SUPPORTED_ARCHITECTURES)


def _hf_config(name: str, where: str, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            fail(f"{where} needs to run the Python code it ships to load; pass "
                 "--trust-remote-code if you trust it")
        fail(f"cannot read the Hugging Face config of {where}: {first_line(e)}")
    except (OSError, KeyError) as e:
        fail(f"cannot load {where} ({first_line(e)}); check the name (and the network / "
             "HF_TOKEN for a hub model), or pass a local checkpoint folder")


def check_causal_lm(config: Any, where: str, trust_remote_code: bool) -> str:
    """The architecture (e.g. LlamaForCausalLM) of a causal LM the bridge can wrap; UserError
    for a model of another kind (a masked LM, a vision model) or an architecture it cannot."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = list(getattr(config, "architectures", None) or [])
    auto_map = getattr(config, "auto_map", None) or {}
    model_type = getattr(config, "model_type", None)
    causal = _causal_lm_classes()
    if archs:
        arch = next((a for a in archs if a in causal), None)
        if arch is None and trust_remote_code and "AutoModelForCausalLM" in auto_map:
            arch = archs[0]  # a remote-code causal LM
        if arch is None:
            fail(f"{where} holds a {archs[0]}, not a causal language model; pass a causal LM "
                 "(a *ForCausalLM / *LMHeadModel checkpoint)")
    elif model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
        config.architectures = [arch]
    else:
        fail(f"{where} is a {model_type or 'model of unknown type'} with no causal-LM head; pass "
             "a causal language model checkpoint")
    supported = _supported_architectures()
    if arch not in supported:
        fail(f"architecture {arch} of {where} cannot be wrapped by TransformerBridge "
             f"(TransformerLens {tl_version()} has adapters for {len(supported)} architectures, "
             "e.g. GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM, Gemma2ForCausalLM); "
             "use a supported architecture or a newer transformer-lens")
    return arch


def _boot(name: str, where: str, device: str, dtype: torch.dtype, trust_remote_code: bool,
          **kwargs: Any) -> Any:
    from transformer_lens.model_bridge import TransformerBridge

    try:
        with _quiet_hf():
            bridge = TransformerBridge.boot_transformers(
                name, device=device, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    except ValueError as e:
        fail(f"TransformerBridge cannot wrap {where}: {first_line(e)}")
    except (OSError, KeyError) as e:
        fail(f"cannot load {where} ({first_line(e)}); check the name (and the network / "
             "HF_TOKEN for a hub model), or pass a local checkpoint folder")
    bridge.eval()
    bridge.requires_grad_(False)
    return bridge


def load_folder(folder: Path, device: str, dtype: torch.dtype, trust_remote_code: bool
                ) -> tuple[Any, Any]:
    """(bridge, tokenizer or None) of a local Hugging Face checkpoint folder."""
    where = f"model folder {folder}"
    if not (folder / "config.json").is_file():
        fail(f"{where} has no config.json; pass a Hugging Face checkpoint folder")
    check_causal_lm(_hf_config(str(folder), where, trust_remote_code), where, trust_remote_code)
    tokenizer = load_tokenizer(str(folder), trust_remote_code=trust_remote_code)
    bridge = _boot(str(folder), where, device, dtype, trust_remote_code,
                   tokenizer=tokenizer if tokenizer is not None else _placeholder_tokenizer())
    return bridge, tokenizer


def _placeholder_tokenizer() -> Any:
    """A one-word tokenizer for booting a checkpoint that ships none: the bridge would otherwise
    build one from the model type (which fails for most without their vocabulary files). The
    model's tokenizer stays None (LoadedModel.tokenizer): such a model reads pre-tokenized ids."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab={"<unk>": 0}, unk_token="<unk>")),
        unk_token="<unk>")


def load_hub(name: str, device: str, dtype: torch.dtype, trust_remote_code: bool
             ) -> tuple[Any, Any]:
    """(bridge, tokenizer) of a Hugging Face hub model (downloaded to the local hub cache)."""
    where = f"hub model {name}"
    check_causal_lm(_hf_config(name, where, trust_remote_code), where, trust_remote_code)
    bridge = _boot(name, where, device, dtype, trust_remote_code)
    return bridge, bridge.tokenizer


def load_gguf(path: Path, device: str, dtype: torch.dtype) -> tuple[Any, Any]:
    """(bridge, tokenizer) of a .gguf file: transformers dequantizes it into a Hugging Face model,
    which the bridge wraps (TransformerLens 4 has no HookedTransformer to convert it to)."""
    from transformers import AutoModelForCausalLM

    where = f"GGUF model {path}"
    try:
        with _quiet_hf():
            hf_model = AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=dtype, attn_implementation="eager")
    except (OSError, ValueError, KeyError) as e:
        fail(f"cannot load the GGUF model {path}: {first_line(e)}")
    hf_model.config.architectures = [type(hf_model).__name__]  # GGUF configs omit it
    check_causal_lm(hf_model.config, where, False)
    tokenizer = load_tokenizer(str(path.parent), gguf_file=path.name)
    hf_model.to(device).eval()
    bridge = _boot(str(path.parent), where, device, dtype, False, hf_model=hf_model,
                   tokenizer=tokenizer if tokenizer is not None else _placeholder_tokenizer())
    return bridge, tokenizer


def folder_fingerprint(folder: Path) -> dict[str, Any]:
    """The folder's files by content, marked as seen through the bridge: its activations are
    the Hugging Face model's own, not HookedTransformer's processed ones, so the same folder
    loaded by the two backends must not pass for one model."""
    fp = files_fingerprint(folder_files(folder), "hf", name=folder.resolve().name)
    return {**fp, "backend": BACKEND, "digest": digest_of([BACKEND, fp["digest"]])}


def hub_fingerprint(name: str) -> dict[str, Any]:
    """A hub model is its name and, where the local hub cache knows it, its commit (refs/main)."""
    revision = None
    try:
        from huggingface_hub import constants

        ref = Path(constants.HF_HUB_CACHE) / f"models--{name.replace('/', '--')}" / "refs" / "main"
        revision = ref.read_text().strip() if ref.is_file() else None
    except Exception:  # noqa: BLE001 - the revision is extra knowledge, never a requirement
        pass
    return {"kind": "hub", "backend": BACKEND, "name": name, "revision": revision,
            "digest": digest_of([BACKEND, name, revision])}


def describe(bridge: Any, tokenizer: Any, dtype: str) -> dict[str, Any]:
    cfg = bridge.cfg
    return {
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "d_vocab": cfg.d_vocab,
        "n_ctx": cfg.n_ctx,
        "n_heads": cfg.n_heads,
        "d_head": cfg.d_head,
        "architecture": cfg.architecture,
        "normalization_type": getattr(cfg, "normalization_type", None),
        "dtype": dtype,
        "tokenizer": None if tokenizer is None else (
            getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__),
        "bos_token_id": None if tokenizer is None else tokenizer.bos_token_id,
        "eos_token_id": None if tokenizer is None else tokenizer.eos_token_id,
        "backend": BACKEND,
        "transformer_lens": tl_version(),
    }
