"""Save and load crosscoders (SAELens has no crosscoder format, so this one is ours).

A saved crosscoder is a folder:

    cfg.json                          arch, hooks, splits, d_sae, params, models, scales folded
    crosscoder_weights.safetensors    float32 weights, input scaling already folded in
    sparsity.safetensors              "sparsity": [d_sae] log10 feature density (SAELens' name)

Weight layout (cfg.json `weight_layout`), hooks in cfg.json `hooks` order:
- "stacked" (every hook has the same d): W_enc [H, d, d_sae], W_dec [d_sae, H, d],
  b_enc [d_sae], b_dec [H, d]  (the layout of seed 001's Crosscoders code);
- "per_hook" (hooks of different widths): W_enc.<i> [d_i, d_sae], W_dec.<i> [d_sae, d_i],
  b_dec.<i> [d_i] for hook i = 0..H-1, and b_enc [d_sae].

A new folder is written under a temporary name and renamed into place. Saving into an existing
folder (a sweep member's, which holds its metrics) replaces only these three files: cfg.json is
removed first and moved in last, so a folder with a cfg.json always holds complete weights.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from shared.errors import fail, first_line
from train_sae.dictionaries import IO, REGISTRY, build, io_kind
from train_sae.dictionaries.crosscoder import CrosscoderShape as Crosscoder
from train_sae.training.saving import CFG_FILENAME as CFG_FILE  # the same names as an SAE's folder
from train_sae.training.saving import write_own_format

FORMAT_VERSION = 1
WEIGHTS_FILE = "crosscoder_weights.safetensors"


def _weights_to_file(cc: Crosscoder) -> tuple[str, dict[str, torch.Tensor]]:
    W_enc, b_enc, W_dec, b_dec = (p.detach().float().cpu() for p in
                                  (cc.W_enc, cc.b_enc, cc.W_dec, cc.b_dec))
    H, d_sae = cc.n_hooks, cc.d_sae
    if len(set(cc.splits)) == 1:
        d = cc.splits[0]
        return "stacked", {
            "W_enc": W_enc.reshape(H, d, d_sae).contiguous(),
            "W_dec": W_dec.reshape(d_sae, H, d).contiguous(),
            "b_enc": b_enc.contiguous(),
            "b_dec": b_dec.reshape(H, d).contiguous(),
        }
    tensors = {"b_enc": b_enc.contiguous()}
    for i, (we, wd, bd) in enumerate(zip(torch.split(W_enc, cc.splits, 0),
                                         torch.split(W_dec, cc.splits, 1),
                                         torch.split(b_dec, cc.splits, 0), strict=True)):
        tensors[f"W_enc.{i}"] = we.contiguous()
        tensors[f"W_dec.{i}"] = wd.contiguous()
        tensors[f"b_dec.{i}"] = bd.contiguous()
    return "per_hook", tensors


def _weights_from_file(layout: str, t: dict[str, torch.Tensor], H: int) -> dict[str, torch.Tensor]:
    """File tensors -> the module's flat state dict (W_enc [D, d_sae], W_dec [d_sae, D], ...)."""
    if layout == "stacked":
        d_sae = t["b_enc"].shape[0]
        return {"W_enc": t["W_enc"].reshape(-1, d_sae), "b_enc": t["b_enc"],
                "W_dec": t["W_dec"].reshape(d_sae, -1), "b_dec": t["b_dec"].reshape(-1)}
    return {"W_enc": torch.cat([t[f"W_enc.{i}"] for i in range(H)], 0), "b_enc": t["b_enc"],
            "W_dec": torch.cat([t[f"W_dec.{i}"] for i in range(H)], 1),
            "b_dec": torch.cat([t[f"b_dec.{i}"] for i in range(H)], 0)}


def save_crosscoder(cc: Crosscoder, folder: str | Path, *, models: str | list[str],
                    sparsity: torch.Tensor, input_scales: list[float] | float,
                    extra_cfg: dict[str, Any] | None = None) -> Path:
    """Write `cc` with its per-hook `input_scales` folded in (cc itself is left untouched).

    models: the model each hook was read from (one name for all, or one per hook, e.g. a base
    and a chat model for model diffing). sparsity: [d_sae] log10 feature density.
    extra_cfg: more cfg.json keys (training settings, metrics); may not shadow the format's keys.
    """
    folder = Path(folder)
    model_list = [models] * cc.n_hooks if isinstance(models, str) else list(models)
    if len(model_list) != cc.n_hooks:
        fail(f"got {len(model_list)} model names for {cc.n_hooks} hooks; give one, or one per hook")
    assert sparsity.shape == (cc.d_sae,), (sparsity.shape, cc.d_sae)
    scales_per_hook = cc.per_hook_scales(input_scales, cc.n_hooks, "input")

    folded = copy.deepcopy(cc).cpu()
    folded.fold_input_scaling(scales_per_hook)
    layout, tensors = _weights_to_file(folded)
    cfg: dict[str, Any] = {
        "format": "crosscoder",
        "format_version": FORMAT_VERSION,
        "arch": cc.arch,
        "hooks": cc.hooks,
        "d_in_per_hook": dict(zip(cc.hooks, cc.splits, strict=True)),
        "splits": cc.splits,
        "d_in": cc.d_in,
        "d_sae": cc.d_sae,
        "params": cc.cfg.to_dict(),
        "models": model_list,
        "input_scales_folded": scales_per_hook,
        "weight_layout": layout,
        "dtype": "float32",
    }
    return write_own_format(folder, WEIGHTS_FILE, tensors, sparsity, cfg, extra_cfg)


def load_crosscoder(folder: str | Path, device: str = "cpu") -> tuple[Crosscoder, dict[str, Any]]:
    """Read a folder written by `save_crosscoder`: (crosscoder on raw activations, cfg dict)."""
    folder = Path(folder)
    cfg_path = folder / CFG_FILE
    if not cfg_path.is_file():
        fail(f"{folder} is not a saved crosscoder (no {CFG_FILE}); point at a folder "
             "written by train-sae")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        fail(f"{cfg_path} is not valid JSON ({e}); the folder is damaged, re-save it")
    arch = cfg.get("arch")
    if cfg.get("format") != "crosscoder" or arch not in REGISTRY or io_kind(arch) != "crosscoder":
        fail(f"{cfg_path} does not describe a crosscoder (arch {cfg.get('arch')!r}); "
             "load SAEs with train_sae.training.saving.load_sae")
    if cfg.get("format_version") != FORMAT_VERSION:
        fail(f"{folder} has crosscoder format version {cfg.get('format_version')}, this version "
             f"reads {FORMAT_VERSION}; re-save it with a matching train-sae")
    missing = [k for k in ("hooks", "splits", "d_sae", "params", "weight_layout") if k not in cfg]
    if missing:
        fail(f"{cfg_path} lacks {', '.join(missing)}; the folder is damaged, re-save it")
    if not isinstance(cfg["hooks"], list) or not isinstance(cfg["splits"], list) or \
            len(cfg["hooks"]) != len(cfg["splits"]) or not isinstance(cfg["params"], dict):
        fail(f"{cfg_path} has malformed hooks, splits or params; the folder is damaged, re-save it")
    cc = build(arch, IO.same(dict(zip(cfg["hooks"], cfg["splits"], strict=True))), cfg["d_sae"],
               cfg["params"], seed=0)
    try:
        tensors = load_file(str(folder / WEIGHTS_FILE))
        state = _weights_from_file(cfg["weight_layout"], tensors, cc.n_hooks)
        # training buffers (TopK's firing counters) are not saved
        missing, unexpected = cc.load_state_dict(state, strict=False)
        buffers = dict(cc.named_buffers())
        if unexpected or any(k not in buffers for k in missing):
            raise KeyError(f"weights {sorted(state)} do not fit {type(cc).__name__}")
    except (FileNotFoundError, SafetensorError, KeyError, RuntimeError) as e:
        fail(f"cannot read the weights in {folder / WEIGHTS_FILE} ({type(e).__name__}: "
             f"{first_line(e)}); the folder is damaged, re-save it")
    return cc.to(device), cfg
