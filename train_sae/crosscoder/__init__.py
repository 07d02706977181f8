"""Acausal crosscoders over several hooks (Crosscoders README, seed 001): model, saving, metrics.

The crosscoder is an `SAE` (train_sae/saes/base.py) on the concatenation of H hooks'
activations, so the one-pass trainer can train it beside ordinary SAEs.
"""

from train_sae.crosscoder.metrics import (
    crosscoder_metrics,
    hook_labels,
    plot_relative_norms,
    relative_decoder_norms,
    save_relative_norms,
)
from train_sae.crosscoder.model import (
    CROSSCODER_REGISTRY,
    Crosscoder,
    CrosscoderConfig,
    CrosscoderTopKConfig,
    TopKCrosscoder,
    build_crosscoder,
    crosscoder_arch_params,
)
from train_sae.crosscoder.saving import load_crosscoder, save_crosscoder

__all__ = [
    "CROSSCODER_REGISTRY",
    "Crosscoder",
    "CrosscoderConfig",
    "CrosscoderTopKConfig",
    "TopKCrosscoder",
    "build_crosscoder",
    "crosscoder_arch_params",
    "crosscoder_metrics",
    "hook_labels",
    "load_crosscoder",
    "plot_relative_norms",
    "relative_decoder_norms",
    "save_crosscoder",
    "save_relative_norms",
]
