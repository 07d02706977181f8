"""`relu`: ReLU SAE with an L1 penalty and unit-norm decoder rows (Towards Monosemanticity, 2023).

    acts  = ReLU((x - b_dec) @ W_enc + b_enc)        W_enc [d_in, d_sae], b_enc [d_sae]
    x_hat = acts @ W_dec + b_dec                     W_dec [d_sae, d_in], b_dec [d_in]
    loss  = mean_batch ||x - x_hat||^2 + l1_coefficient * mean_batch sum_i acts_i

Decoder rows stay unit norm (see `UnitNormDecoder`), so the L1 cannot be dodged by shrinking
acts and growing rows. W_enc, b_enc, W_dec are plain parameters, which the trainer's Anthropic
resampling of dead latents rewrites in place (Conmy's tricks 2 and 3).
"""

from __future__ import annotations

from train_sae.dictionaries.common import LinearSAE, UnitNormDecoder
from train_sae.dictionaries.sparsity import ReluL1, ReluL1Config


class ReluSAE(ReluL1, UnitNormDecoder, LinearSAE):
    arch = "relu"
    saelens_architecture = "standard"
    Config = ReluL1Config
    resamples = True  # Anthropic resampling applies (train_sae/training/resampling.py)
    stackable = True  # its dense step (train_sae/training/stack.py)
