"""The crosscoder recovers which hook each planted feature lives in (the model-diffing view).

Synthetic data over two hooks: some unit directions live only in hook A, some only in hook B,
and some in both (a different direction in each hook, firing together with the same
magnitude). After a short Adam loop the latent matching each planted feature must have a
relative decoder norm near 0 (A only), near 1 (B only) or near 0.5 (shared).
"""

from __future__ import annotations

import pytest
import torch
from synthetic import build_crosscoder, make_paired_data

from train_sae.dictionaries.base import TrainProgress
from train_sae.dictionaries.crosscoder import Crosscoder
from train_sae.evaluation.crosscoder_metrics import crosscoder_metrics, relative_decoder_norms

D_HOOK = 32  # width of each hook
N_EACH = 6  # planted features per kind: A only, B only, shared
FIRE_PROB = 0.08


def planted_data(n_rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [n_rows, 2 * D_HOOK]; features: [3 * N_EACH, 2 * D_HOOK] (A only, B only, shared)."""
    x_a, x_b, features = make_paired_data(n_rows, D_HOOK, N_EACH, FIRE_PROB, seed)
    return torch.cat([x_a, x_b], dim=1), features


def train(cc: Crosscoder, x: torch.Tensor, steps: int, seed: int) -> None:
    opt = torch.optim.Adam(cc.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        batch = x[torch.randint(0, len(x), (256,), generator=g)]
        out = cc.training_forward(batch, TrainProgress(step, steps, step * 256))
        opt.zero_grad()
        out.loss.backward()
        cc.before_optimizer_step()
        opt.step()
        cc.after_optimizer_step()


def matched_relative_norms(cc: Crosscoder, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """For each planted feature: best cosine with any decoder row, and that latent's rel. norm."""
    with torch.no_grad():
        dec = cc.W_dec / cc.W_dec.norm(dim=1, keepdim=True)  # [d_sae, D]
        feat = features / features.norm(dim=1, keepdim=True)  # [n_features, D]
        best = (feat @ dec.T).max(dim=1)
    rel = relative_decoder_norms(cc.W_dec, cc.splits)
    return best.values, rel[best.indices]


@pytest.mark.parametrize("arch, params", [
    ("crosscoder", {"l1_coefficient": 0.1}),
    ("crosscoder_topk", {"k": 4}),
])
def test_relative_decoder_norms_find_where_features_live(arch, params):
    x, features = planted_data(8192, seed=0)
    cc = build_crosscoder(arch, [D_HOOK, D_HOOK], ["A", "B"], 64, params, seed=0)
    before = crosscoder_metrics(x, cc(x).detach(), cc.encode(x).detach(), cc.splits, cc.hooks)
    train(cc, x, steps=1500, seed=1)
    with torch.no_grad():
        acts = cc.encode(x)
        m = crosscoder_metrics(x, cc.decode(acts), acts, cc.splits, cc.hooks)
    assert before["fvu/A"] > 0.9 and before["fvu/B"] > 0.9
    assert m["fvu/A"] < 0.05 and m["fvu/B"] < 0.05, m
    assert m["l0"] < 6.0, m  # 18 features firing with p=0.08 -> ~1.4 active per token

    cos, rel = matched_relative_norms(cc, features)
    assert (cos > 0.9).all(), cos
    a_only, b_only, shared = rel[:N_EACH], rel[N_EACH:2 * N_EACH], rel[2 * N_EACH:]
    assert (a_only < 0.15).all(), a_only
    assert (b_only > 0.85).all(), b_only
    assert ((shared > 0.3) & (shared < 0.7)).all(), shared
