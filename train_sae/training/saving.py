"""Save and load trained SAEs and transcoders as folders SAELens (>= 6) loads with
`SAE.load_from_disk`.

A run folder holds:
    cfg.json                 SAELens 6 config (architecture, d_in, d_sae, dtype, device,
                             apply_b_dec_to_input, normalize_activations, metadata, k for topk)
                             plus our own section "train_sae" (arch, hyperparameters, input scale,
                             and whatever the caller adds)
    sae_weights.safetensors  inference weights under SAELens' names and shapes
    sparsity.safetensors     {"sparsity": log10 feature density [d_sae]}

Our architectures map to SAELens ones: relu and april -> "standard" (april with
apply_b_dec_to_input false), topk -> "topk", batchtopk -> "jumprelu" (its inference form, a
JumpReLU with the learned threshold repeated per latent), jumprelu -> "jumprelu" (threshold =
exp(log_threshold)), gated -> "gated", matryoshka_batchtopk -> "jumprelu" (as SAELens saves its
own for inference). Transcoders: ReLU -> "transcoder" / "skip_transcoder", JumpReLU and BatchTopK
-> "jumprelu_transcoder" / "jumprelu_skip_transcoder" (with `d_out` and metadata `hook_name_out`),
and TopK, which SAELens has no format for, -> "topk_transcoder" (ours: the same weight names
W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_out], b_dec [d_out], W_skip [d_out, d_in] for a skip
transcoder, and `k` in cfg.json; y = topk(ReLU(x @ W_enc + b_enc)) @ W_dec + b_dec (+ x @
W_skip^T)). The training-time input (and output) scaling is folded into the saved weights, so the
saved dictionary takes and returns raw activations (normalize_activations "none").
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from shared.atomic import atomic_write, atomic_write_text, write_folder_files, write_safetensors
from shared.errors import fail
from train_sae.dictionaries import IO, REGISTRY, SAE, build, io_kind

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"
OUR_SECTION = "train_sae"
# the SAELens config format these files follow (read by SAELens' handle_config_defaulting)
SAELENS_FORMAT_VERSION = "6.0.0"


def save_sae(
    sae: SAE,
    folder: str | Path,
    *,
    hook: str,
    model: str,
    d_in: int,
    extra_cfg: dict[str, Any],
    sparsity: torch.Tensor,
    input_scale: float,
    out_hook: str | None = None,
    output_scale: float | None = None,
) -> Path:
    """Write `sae` (trained on activations times `input_scale`; a transcoder predicting
    `out_hook`'s activations times `output_scale`) as a SAELens-loadable folder.

    `sparsity` [d_sae] is the log10 firing density of each latent. The dictionary passed in is
    not modified; a copy with the scaling folded in is saved. cfg.json is written last, so a
    folder with a cfg.json is complete.
    """
    if d_in != sae.d_in:
        fail(f"d_in {d_in} does not match the SAE's input size {sae.d_in}")
    if sparsity.shape != (sae.d_sae,):
        fail(f"sparsity must have shape ({sae.d_sae},), got {tuple(sparsity.shape)}")
    if not input_scale > 0:
        fail(f"input_scale must be > 0 (got {input_scale})")
    transcoder = sae.io_kind == "transcoder"
    if transcoder and out_hook is None:
        fail("a transcoder is saved with the hook it predicts (out_hook)")
    out_scale = float(input_scale if output_scale is None else output_scale)
    folded = copy.deepcopy(sae).cpu().float()
    folded.fold_scaling(float(input_scale), out_scale)
    weights = {k: v.detach().float().contiguous().clone() for k, v in folded.saelens_state().items()}

    cfg: dict[str, Any] = {
        "architecture": sae.saelens_architecture,
        "d_in": sae.d_in,
        **({"d_out": sae.d_out} if transcoder else {}),
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": bool(sae.apply_b_dec_to_input),
        "normalize_activations": "none",
        "reshape_activations": "none",
        **sae.saelens_cfg(),
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "sae_lens_training_version": None,
            "model_name": model,
            "hook_name": hook,
            **({"hook_name_out": out_hook} if transcoder else {}),
        },
        OUR_SECTION: {
            **extra_cfg,
            "arch": sae.arch,
            "hyperparameters": sae.cfg.to_dict(),
            "input_scale": float(input_scale),
            **({"output_scale": out_scale} if transcoder else {}),
        },
    }
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / CFG_FILENAME).unlink(missing_ok=True)  # an old cfg.json must not vouch for new weights
    atomic_write(out / WEIGHTS_FILENAME, lambda p: write_safetensors(p, weights))
    log_density = sparsity.detach().float().cpu().contiguous().clone()
    atomic_write(out / SPARSITY_FILENAME,
                 lambda p: write_safetensors(p, {"sparsity": log_density}))
    atomic_write_text(out / CFG_FILENAME, json.dumps(cfg, indent=2))
    return out


# SAELens architecture -> ours (and the hyperparameters that pick it), for folders written by
# SAELens itself (no "train_sae" section)
_FROM_SAELENS: dict[str, tuple[str, dict[str, Any]]] = {
    "topk": ("topk", {}), "jumprelu": ("jumprelu", {}), "gated": ("gated", {}),
    "transcoder": ("transcoder", {"sparsity": "relu"}),
    "skip_transcoder": ("skip_transcoder", {"sparsity": "relu"}),
    "jumprelu_transcoder": ("transcoder", {"sparsity": "jumprelu"}),
    "jumprelu_skip_transcoder": ("skip_transcoder", {"sparsity": "jumprelu"}),
}


def load_sae(folder: str | Path) -> tuple[SAE, dict[str, Any]]:
    """Read a saved SAE or transcoder (ours, or a SAELens one of a supported architecture) in
    eval mode; its hooks are named as cfg.json's metadata names them."""
    path = Path(folder)
    cfg_path, weights_path = path / CFG_FILENAME, path / WEIGHTS_FILENAME
    if not cfg_path.exists() or not weights_path.exists():
        fail(f"{path} is not a saved SAE (needs {CFG_FILENAME} and {WEIGHTS_FILENAME})")
    cfg = read_cfg(cfg_path)
    state = read_tensors(weights_path)
    ours = cfg.get(OUR_SECTION, {})
    if not isinstance(ours, dict):
        fail(f"{cfg_path}: {OUR_SECTION!r} is not an object; save the SAE again")
    arch, params = _arch_and_params(cfg, ours, path)
    if cfg.get("normalize_activations", "none") != "none":
        fail(f"{path} uses normalize_activations={cfg['normalize_activations']!r}; fold it first")
    try:
        d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
        d_out = int(cfg.get("d_out", d_in))
    except (KeyError, TypeError, ValueError):
        fail(f"{path / CFG_FILENAME} lacks integer d_in and d_sae; save the SAE again")
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    hook = str(meta.get("hook_name") or cfg.get("hook_name") or "x")
    if io_kind(arch) == "transcoder":
        out_hook = str(meta.get("hook_name_out") or cfg.get("hook_name_out") or "y")
        io = IO.of({hook: d_in}, {out_hook: d_out})
    else:
        io = IO.same({hook: d_in})
    sae = build(arch, io, d_sae, params, 0)
    sae.apply_b_dec_to_input = bool(cfg.get("apply_b_dec_to_input", sae.apply_b_dec_to_input))
    expected = {k: v.shape for k, v in sae.saelens_state().items()}
    got = {k: state[k].shape for k in expected if k in state}
    if got != expected:
        fail(f"{weights_path} holds {got}, expected {expected} for arch {arch!r}; save it again")
    sae.load_saelens_state({k: state[k].float() for k in expected})
    return sae.eval(), cfg


def write_own_format(folder: Path, weights_file: str, tensors: dict[str, torch.Tensor],
                     sparsity: torch.Tensor, cfg: dict[str, Any],
                     extra_cfg: dict[str, Any] | None) -> Path:
    """A run folder in one of our own formats (crosscoders, CLTs): weights, sparsity and
    cfg.json (plus `extra_cfg`, which may not shadow the format's keys) written as one unit,
    cfg.json last (shared/atomic.py write_folder_files)."""
    clash = sorted(set(extra_cfg or {}) & set(cfg))
    assert not clash, f"extra_cfg may not override {clash}"
    doc = {**cfg, **(extra_cfg or {})}
    write_folder_files(folder, {
        weights_file: lambda p: write_safetensors(p, tensors),
        SPARSITY_FILENAME: lambda p: write_safetensors(
            p, {"sparsity": sparsity.detach().float().cpu().contiguous()}),
        CFG_FILENAME: lambda p: p.write_text(json.dumps(doc, indent=2) + "\n"),
    }, last=CFG_FILENAME)
    return folder


def read_cfg(path: Path) -> dict[str, Any]:
    """A run's cfg.json as a dict; a UserError naming the file if it is not a JSON object."""
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        fail(f"cannot read {path} ({e}); save the SAE again")
    if not isinstance(cfg, dict):
        fail(f"{path} holds a JSON {type(cfg).__name__}, not a config object; save the SAE again")
    return cfg


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file; a UserError naming the file if it is damaged."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        fail(f"cannot read {path} ({e}); save the SAE again")


def read_log10_density(folder: Path) -> torch.Tensor | None:
    """[d_sae] log10 feature density from a run's sparsity.safetensors (None if absent)."""
    path = folder / SPARSITY_FILENAME
    if not path.exists():
        return None
    tensors = read_tensors(path)
    t = tensors.get("sparsity", next(iter(tensors.values()), None))
    return None if t is None else t.float().reshape(-1)


def _arch_and_params(cfg: dict[str, Any], ours: dict[str, Any], path: Path) -> tuple[str, dict]:
    if "arch" in ours:
        if ours["arch"] not in REGISTRY:
            fail(f"{path} was saved by arch {ours['arch']!r}, unknown to this version")
        return ours["arch"], dict(ours.get("hyperparameters", {}))
    saelens_arch = cfg.get("architecture", "standard")
    if saelens_arch == "standard":
        return ("relu" if cfg.get("apply_b_dec_to_input", True) else "april"), {}
    if saelens_arch not in _FROM_SAELENS:
        fail(f"{path} has SAELens architecture {saelens_arch!r}, which cannot be loaded here")
    if saelens_arch == "topk":
        if cfg.get("rescale_acts_by_decoder_norm", False):
            fail(f"{path} is a topk SAE with rescale_acts_by_decoder_norm, not supported here")
        return "topk", {"k": int(cfg.get("k", 100))}
    arch, params = _FROM_SAELENS[saelens_arch]
    return arch, dict(params)
