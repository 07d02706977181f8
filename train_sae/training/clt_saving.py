"""Save and load cross-layer transcoders (format "clt", ours: SAELens has none).

A saved CLT is a folder:

    cfg.json                 format "clt", arch, sparsity, hooks (inputs, in layer order),
                             out_hooks, d_in and d_out (per layer), n_layers, d_sae (all layers),
                             n_per_layer, params, models, k (TopK), the folded scales
    clt_weights.safetensors  float32, the training scaling already folded in:
                             W_enc [L, d_in, n], b_enc [L, n],
                             W_dec.<l> [n, L - l, d_out] for each source layer l (circuit-tracer's
                             layout: its latents' decoders for output layers l..L-1),
                             b_dec [L, d_out], threshold [L * n] (JumpReLU and BatchTopK)
    sparsity.safetensors     "sparsity": [L * n] log10 feature density (SAELens' name)

Latents are in layer-major order (latent l * n + i is latent i of layer l). Inference:

    pre_l = x_l @ W_enc[l] + b_enc[l]
    acts  = topk: the k largest of ReLU(pre) among each layer's n latents; jumprelu, batchtopk:
            ReLU(pre) * (pre > threshold); relu: ReLU(pre)
    y_t   = sum_{l <= t} acts_l @ W_dec.<l>[:, t - l] + b_dec[t]

`load_clt` gives back the `CrossLayerTranscoder` module (train_sae/dictionaries/clt.py).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from shared.errors import fail
from train_sae.dictionaries import IO, REGISTRY, build, io_kind
from train_sae.dictionaries.clt import CrossLayerTranscoder
from train_sae.training.saving import CFG_FILENAME, read_cfg, read_tensors, write_own_format

FORMAT = "clt"
FORMAT_VERSION = 1
WEIGHTS_FILE = "clt_weights.safetensors"


def save_clt(clt: CrossLayerTranscoder, folder: str | Path, *, models: list[str],
             sparsity: torch.Tensor, input_scales: list[float], output_scales: list[float],
             extra_cfg: dict[str, Any] | None = None) -> Path:
    """Write `clt` (trained on inputs x_l * input_scales[l], predicting y_t *
    output_scales[t]) with the scales folded in; `clt` itself is left untouched."""
    folder = Path(folder)
    assert sparsity.shape == (clt.d_sae,), (sparsity.shape, clt.d_sae)
    folded = copy.deepcopy(clt).cpu().float()
    folded.fold_scaling(input_scales, output_scales)
    tensors = {k: v.detach().float().contiguous().clone()
               for k, v in folded.saelens_state().items()}
    cfg: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "arch": clt.arch, "sparsity": clt.sparsity,
        "hooks": clt.in_hooks, "out_hooks": clt.out_hooks,
        "d_in": clt.io.in_splits[0], "d_out": clt.io.out_splits[0],
        "n_layers": clt.n_layers, "d_sae": clt.d_sae, "n_per_layer": clt.n_per_layer,
        "params": clt.cfg.to_dict(), **clt.saelens_cfg(),
        "models": list(models),
        "input_scales_folded": clt.per_hook_scales(input_scales, clt.n_layers, "input"),
        "output_scales_folded": clt.per_hook_scales(output_scales, clt.n_layers, "output"),
        "dtype": "float32",
    }
    return write_own_format(folder, WEIGHTS_FILE, tensors, sparsity, cfg, extra_cfg)


def load_clt(folder: str | Path, device: str = "cpu") -> tuple[CrossLayerTranscoder,
                                                                dict[str, Any]]:
    """Read a folder written by `save_clt`: (the CLT on raw activations, in eval mode, cfg)."""
    folder = Path(folder)
    if not (folder / CFG_FILENAME).is_file():
        fail(f"{folder} is not a saved CLT (no {CFG_FILENAME}); point at a folder written by "
             "train-sae")
    cfg = read_cfg(folder / CFG_FILENAME)
    arch = cfg.get("arch")
    if cfg.get("format") != FORMAT or arch not in REGISTRY or io_kind(arch) != "clt":
        fail(f"{folder / CFG_FILENAME} does not describe a CLT (format {cfg.get('format')!r}, "
             f"arch {arch!r})")
    if cfg.get("format_version") != FORMAT_VERSION:
        fail(f"{folder} has CLT format version {cfg.get('format_version')}, this version reads "
             f"{FORMAT_VERSION}; re-save it with a matching train-sae")
    try:
        hooks, out_hooks = list(cfg["hooks"]), list(cfg["out_hooks"])
        io = IO.of({h: int(cfg["d_in"]) for h in hooks}, {h: int(cfg["d_out"]) for h in out_hooks})
        clt = build(arch, io, int(cfg["d_sae"]), dict(cfg["params"]), 0)
    except (KeyError, TypeError, ValueError) as e:
        fail(f"{folder / CFG_FILENAME} is missing or has a malformed {e}; re-save the CLT")
    state = read_tensors(folder / WEIGHTS_FILE)
    expected = {k: v.shape for k, v in clt.saelens_state().items()}
    got = {k: state[k].shape for k in expected if k in state}
    if got != expected:
        fail(f"{folder / WEIGHTS_FILE} holds {got}, expected {expected}; re-save the CLT")
    clt.load_saelens_state({k: state[k].float() for k in expected})
    return clt.to(device).eval(), cfg
