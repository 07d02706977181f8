"""Crosscoder metrics: per-hook reconstruction quality and the model-diffing decoder-norm view.

- `crosscoder_metrics`: the usual batch metrics on the concatenation, plus FVU and MSE of each
  hook's block. L0 is one number: latents are shared by every hook, so a token activates the same
  latents whichever hook is read; how much a latent writes to each hook is what
  `relative_decoder_norms` measures.
- `relative_decoder_norms`: ||W_dec[i, b]|| / (||W_dec[i, a]|| + ||W_dec[i, b]||) per latent, the
  histogram of Anthropic's crosscoder model-diffing figures (0 = only in hook a, 1 = only in
  hook b, 0.5 = equally in both).
- `save_relative_norms`: for a two-hook crosscoder, the values, their histogram and summary
  counts, written next to a trained crosscoder (what `train-sae sweep` puts in a member folder).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from shared.atomic import atomic_write, write_safetensors
from shared.errors import fail
from train_sae.evaluation.metrics import metric_tensors

HIST_BINS = 50
RELATIVE_NORMS_FILE = "relative_norms.safetensors"
RELATIVE_NORMS_PLOT = "relative_norms.png"
# summary bins of the relative norm (Anthropic's crosscoder diffing: exclusive vs shared latents)
ONLY_A_BELOW, SHARED_RANGE, ONLY_B_ABOVE = 0.1, (0.3, 0.7), 0.9


def _hook_names(splits: Sequence[int], hooks: Sequence[str] | None) -> list[str]:
    if hooks is None:
        return [str(i) for i in range(len(splits))]
    assert len(hooks) == len(splits), (hooks, splits)
    return list(hooks)


def crosscoder_metrics(x: torch.Tensor, x_hat: torch.Tensor, acts: torch.Tensor,
                       splits: Sequence[int], hooks: Sequence[str] | None = None
                       ) -> dict[str, float]:
    """x, x_hat: [batch, D]; acts: [batch, d_sae] -> l0, mse, fvu, cos_sim, l2_ratio over the
    concatenation, and `fvu/<hook>`, `mse/<hook>` per hook (hook index when `hooks` is None)."""
    assert x.shape == x_hat.shape and x.shape[-1] == sum(splits), (x.shape, x_hat.shape, splits)
    blocks = dict(zip(_hook_names(splits, hooks), splits, strict=True))
    return {k: float(v) for k, v in metric_tensors(x, x_hat, acts, blocks).items()}


@torch.no_grad()
def relative_decoder_norms(W_dec: torch.Tensor, splits: Sequence[int], a: int = 0, b: int = 1,
                           input_scales: Sequence[float] | None = None) -> torch.Tensor:
    """Each latent's share of decoder norm in hook b versus hook a: [d_sae] in [0, 1].

    W_dec: [d_sae, D] (or the stacked [d_sae, H, d]). A latent with a zero decoder in both hooks
    gets NaN. `input_scales`: the per-hook scales folded into a saved crosscoder's weights
    (cfg.json `input_scales_folded`); passing them reads the norms in training units, where the
    hooks have comparable norms, as the crosscoder was trained.
    """
    W_dec = W_dec.detach().float().reshape(W_dec.shape[0], -1)  # [d_sae, D]
    if W_dec.shape[1] != sum(splits):
        fail(f"decoder has {W_dec.shape[1]} columns but the hooks' d_in sum to {sum(splits)}")
    for name, idx in (("a", a), ("b", b)):
        if not 0 <= idx < len(splits):
            fail(f"hook index {name}={idx} is out of range for {len(splits)} hooks")
    if a == b:
        fail(f"compare two different hooks, got a = b = {a}")
    blocks = torch.split(W_dec, list(splits), dim=1)
    norm_a, norm_b = blocks[a].norm(dim=1), blocks[b].norm(dim=1)  # [d_sae] each
    if input_scales is not None:
        if len(input_scales) != len(splits):
            fail(f"got {len(input_scales)} input scales for {len(splits)} hooks")
        # folding divided hook h's decoder by s_h; multiply back
        norm_a, norm_b = norm_a * input_scales[a], norm_b * input_scales[b]
    total = norm_a + norm_b
    return torch.where(total > 0, norm_b / total, torch.full_like(total, float("nan")))


def plot_relative_norms(values: torch.Tensor, path: str | Path,
                        labels: tuple[str, str] = ("hook a", "hook b")) -> Path:
    """Histogram of relative decoder norms (NaNs dropped) saved as an image at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    if not path.parent.is_dir():
        fail(f"cannot write {path}: folder {path.parent} does not exist; create it first")
    v = values.detach().float().flatten()
    v = v[torch.isfinite(v)].cpu().numpy()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(v, bins=HIST_BINS, range=(0.0, 1.0), color="tab:blue", edgecolor="white", linewidth=0.3)
    ax.set_xlim(0.0, 1.0)
    ax.set_xticks([0.0, 0.25, 0.5, 0.75, 1.0])
    ax.set_xticklabels([f"0\nonly {labels[0]}", "0.25", "0.5\nshared", "0.75",
                        f"1\nonly {labels[1]}"])
    ax.set_xlabel(f"relative decoder norm  ||W_dec[{labels[1]}]|| / "
                  f"(||W_dec[{labels[0]}]|| + ||W_dec[{labels[1]}]||)")
    ax.set_ylabel("latents")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"Crosscoder latents by hook ({len(v)} latents)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def hook_labels(a: str, b: str) -> tuple[str, str]:
    """Short labels for two hooks: the model tags when they are the same hook of two models
    (`base/blocks.0.hook_resid_post`, `chat/blocks.0.hook_resid_post` -> base, chat), else the
    hook names."""
    tag_a, sep_a, rest_a = a.partition("/")
    tag_b, sep_b, rest_b = b.partition("/")
    if sep_a and sep_b and rest_a == rest_b:
        return tag_a, tag_b
    return a, b


def relative_norm_summary(values: torch.Tensor, hooks: Sequence[str]) -> dict:
    """Counts of latents per region of the relative decoder norm (NaN = zero decoder: `zero`)."""
    v = values.detach().float().flatten()
    lo, hi = SHARED_RANGE
    return {
        "hooks": list(hooks),
        "labels": list(hook_labels(*hooks)),
        "only_a": int((v < ONLY_A_BELOW).sum()),
        "shared": int(((v >= lo) & (v <= hi)).sum()),
        "only_b": int((v > ONLY_B_ABOVE).sum()),
        "zero": int(torch.isnan(v).sum()),
        "n_latents": int(v.numel()),
        "bins": {"only_a": f"< {ONLY_A_BELOW}", "shared": f"{lo}..{hi}",
                 "only_b": f"> {ONLY_B_ABOVE}"},
        "file": RELATIVE_NORMS_FILE,
    }


def save_relative_norms(W_dec: torch.Tensor, splits: Sequence[int], hooks: Sequence[str],
                        folder: str | Path) -> dict:
    """Relative decoder norms of a two-hook crosscoder (W_dec [d_sae, D] in training units) into
    `folder`: the values (`relative_norms.safetensors`, key "relative_norms"), the histogram
    (`relative_norms.png`); returns the summary counts."""
    assert len(splits) == len(hooks) == 2, (splits, hooks)
    folder = Path(folder)
    values = relative_decoder_norms(W_dec, splits).cpu()  # [d_sae]
    atomic_write(folder / RELATIVE_NORMS_FILE,
                 lambda tmp: write_safetensors(tmp, {"relative_norms": values.contiguous()}))
    plot_relative_norms(values, folder / RELATIVE_NORMS_PLOT, labels=hook_labels(*hooks))
    return relative_norm_summary(values, hooks)
