"""`topk`: TopK SAE with the AuxK loss on dead latents (Gao et al. 2024, "Scaling and evaluating
sparse autoencoders"), following the choices of SAELens PR #370 (seed 000); the sparsity and
AuxK are `TopK` in sparsity.py.

    pre   = (x - b_dec) @ W_enc + b_enc                         [batch, d_sae]
    acts  = the k largest of ReLU(pre) per token, others 0
    x_hat = acts @ W_dec + b_dec
    loss  = mean_batch ||x - x_hat||^2 + aux_coefficient * aux

Decoder rows are kept at unit norm and W_enc = W_dec^T at init, as in Gao et al.
"""

from __future__ import annotations

from train_sae.dictionaries.common import LinearSAE, UnitNormDecoder
from train_sae.dictionaries.sparsity import TopK, TopKConfig


class TopKSAE(TopK, UnitNormDecoder, LinearSAE):
    arch = "topk"
    saelens_architecture = "topk"
    Config = TopKConfig
    stackable = True  # its dense step (train_sae/training/stack.py), a k sweep too
    stack_varying = ("k",)
