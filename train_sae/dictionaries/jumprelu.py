"""`jumprelu`: JumpReLU SAE trained with an L0 penalty through straight-through estimators
(Rajamanoharan et al. 2024b, "Jumping Ahead: Improving Reconstruction Fidelity with JumpReLU
SAEs"); the sparsity is `JumpReLU` in sparsity.py.

    pre   = x @ W_enc + b_enc                        (no b_dec subtraction, as in the paper)
    acts  = pre * H(pre - theta),  theta = exp(log_threshold)   [d_sae], learned
    x_hat = acts @ W_dec + b_dec
    loss  = mean_batch ||x - x_hat||^2 + l0_coefficient * mean_batch sum_i H(pre_i - theta_i)

Decoder rows are kept at unit norm (the paper fixes decoder norms, as the Gated SAE paper does).
"""

from __future__ import annotations

from train_sae.dictionaries.common import LinearSAE, UnitNormDecoder
from train_sae.dictionaries.sparsity import JumpReLU, JumpReLUConfig


class JumpReLUSAE(JumpReLU, UnitNormDecoder, LinearSAE):
    arch = "jumprelu"
    saelens_architecture = "jumprelu"
    Config = JumpReLUConfig
