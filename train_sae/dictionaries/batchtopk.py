"""`batchtopk`: BatchTopK SAE (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders"); the
sparsity is `BatchTopK` in sparsity.py: a budget of k x batch latents over the whole batch in
training, a learned threshold (a JumpReLU) at inference. Unit-norm decoder, dead-latent tracking
and AuxK as `topk`. Saved as SAELens architecture "jumprelu" with the threshold repeated per
latent, as SAELens saves its own BatchTopK SAEs for inference.
"""

from __future__ import annotations

from train_sae.dictionaries.common import LinearSAE, UnitNormDecoder
from train_sae.dictionaries.sparsity import BatchTopK, BatchTopKConfig


class BatchTopKSAE(BatchTopK, UnitNormDecoder, LinearSAE):
    arch = "batchtopk"
    saelens_architecture = "jumprelu"
    Config = BatchTopKConfig
