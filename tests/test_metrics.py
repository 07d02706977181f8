"""Metrics against hand computation on small tensors."""

import math

import pytest
import torch

from train_sae.evaluation.metrics import FeatureDensity, batch_metrics, fvu


def test_batch_metrics_by_hand():
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    x_hat = torch.tensor([[3.0, 0.0], [2.0, 0.0]])
    acts = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 5.0]])
    m = batch_metrics(x, x_hat, acts)
    assert m["l0"] == pytest.approx(1.5)
    # squared errors: 0, 16, 1, 0 -> mean over 4 elements
    assert m["mse"] == pytest.approx(17 / 4)
    # mean x = (2, 2); total SS = (1+4) + (1+4) = 10
    assert m["fvu"] == pytest.approx(17 / 10)
    assert m["cos_sim"] == pytest.approx((9 / (5 * 3) + 1.0) / 2)
    assert m["l2_ratio"] == pytest.approx((3 / 5 + 2 / 1) / 2)


def test_fvu_perfect_and_mean_reconstruction():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    assert float(fvu(x, x)) == 0.0
    assert float(fvu(x, x.mean(0, keepdim=True).expand_as(x))) == pytest.approx(1.0)


def test_feature_density_windows():
    fd = FeatureDensity(4)
    fd.update(torch.tensor([[1.0, 0, 0, 0], [1.0, 2.0, 0, 0]]))
    fd.update(torch.tensor([[0.5, 0, 0, 0], [0.0, 0, 0, 0], [0.1, 0, 0, 0]]))
    assert fd.n_tokens == 5
    assert fd.density().tolist() == pytest.approx([4 / 5, 1 / 5, 0, 0])
    assert fd.dead_fraction == pytest.approx(0.5)
    assert fd.dense_fraction == pytest.approx(0.5)  # 0.8 and 0.2 exceed 10%
    assert fd.dead_mask().tolist() == [False, False, True, True]
    state = fd.state_dict()
    fd.reset()
    assert fd.n_tokens == 0 and fd.dead_fraction == 1.0
    fd.load_state_dict(state)
    assert fd.density()[0].item() == pytest.approx(0.8)
    assert not math.isnan(fd.dense_fraction)
