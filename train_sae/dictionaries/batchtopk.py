"""`batchtopk`: BatchTopK SAE (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders").

Training keeps the k * batch largest entries of ReLU(pre) over the whole batch (so tokens share
a budget of k on average; with data-parallel ranks, over every rank's share together), with the
same unit-norm decoder, dead-latent tracking and AuxK loss as `topk`. It also learns a
threshold: an exponential moving average (rate `threshold_ema`) of the smallest positive
activation kept in each batch, started at the first batch's value. At inference `encode()` is a
JumpReLU with that threshold, ReLU(pre) * (pre > threshold), which is per token and needs no
batch; that is also how it is saved (SAELens architecture "jumprelu" with a `threshold` vector,
as SAELens saves its own BatchTopK SAEs for inference).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shared.errors import fail
from train_sae.dictionaries.common import check_fraction
from train_sae.dictionaries.topk import TopKConfig, TopKSAE


@dataclass
class BatchTopKConfig(TopKConfig):
    threshold_ema: float = 0.01
    """rate of the moving average of the smallest kept activation (the inference threshold)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("threshold_ema", self.threshold_ema)


class BatchTopKSAE(TopKSAE):
    arch = "batchtopk"
    saelens_architecture = "jumprelu"
    Config = BatchTopKConfig

    def __init__(self, d_in: int, d_sae: int, cfg: BatchTopKConfig, seed: int = 0):
        super().__init__(d_in, d_sae, cfg, seed)
        # inference threshold on ReLU(pre); negative means "no batch seen yet" (then encode = ReLU)
        self.register_buffer("threshold", torch.tensor(-1.0))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.hidden_pre(x)
        return torch.relu(pre) * (pre > self.threshold)

    def select(self, pre_relu: torch.Tensor) -> torch.Tensor:
        batch = self.batch_group
        keep = min(self.cfg.k * batch.rows(pre_relu.shape[0]), batch.rows(pre_relu.numel()))
        top = batch.top_values(pre_relu.flatten(), keep)  # [keep], over the whole batch
        # keep every entry at or above the smallest of them (the same entries, barring exact ties)
        acts = pre_relu * (pre_relu >= top.min())
        if self.training:
            self.update_threshold(top.detach())
        return acts

    @torch.no_grad()
    def update_threshold(self, kept: torch.Tensor) -> None:
        positive = kept[kept > 0]
        if positive.numel() == 0:
            return
        low = positive.min()
        if self.threshold < 0:
            self.threshold.copy_(low)
        else:
            self.threshold.lerp_(low, self.cfg.threshold_ema)

    def saelens_cfg(self) -> dict:
        return {}

    def saelens_state(self) -> dict[str, torch.Tensor]:
        state = super().saelens_state()
        state["threshold"] = self.threshold.detach().clamp_min(0).expand(self.d_sae).clone()
        return state

    def load_saelens_state(self, state: dict[str, torch.Tensor]) -> None:
        super().load_saelens_state(state)
        threshold = state["threshold"]  # [d_sae], one value repeated
        if not torch.all(threshold == threshold[0]):
            fail("this batchtopk SAE has per-latent thresholds; load it with arch 'jumprelu'")
        with torch.no_grad():
            self.threshold.copy_(threshold[0])
