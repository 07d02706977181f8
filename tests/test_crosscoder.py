"""Crosscoder model and metrics: shapes, the L1 weighting, init, scaling folds, validation."""

from __future__ import annotations

import math

import matplotlib.image
import pytest
import torch
from synthetic import build_crosscoder

from shared.errors import UserError
from train_sae.dictionaries import arch_params
from train_sae.dictionaries.base import TrainProgress
from train_sae.dictionaries.crosscoder import Crosscoder, TopKCrosscoder
from train_sae.evaluation.crosscoder_metrics import (
    crosscoder_metrics,
    plot_relative_norms,
    relative_decoder_norms,
)


def _perturbed(arch: str, splits: list[int], d_sae: int, params: dict, seed: int = 0):
    """A crosscoder with non-trivial biases (init sets them to zero)."""
    cc = build_crosscoder(arch, splits, [f"h{i}" for i in range(len(splits))], d_sae, params, seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        cc.b_enc.copy_(0.05 * torch.randn(d_sae, generator=g))
        cc.b_dec.copy_(torch.randn(sum(splits), generator=g))
    return cc


def test_shapes_and_views_equal_widths():
    cc = build_crosscoder("crosscoder", [8, 8, 8], ["a", "b", "c"], 20, {}, seed=0)
    assert cc.d_in == 24 and cc.W_enc.shape == (24, 20) and cc.W_dec.shape == (20, 24)
    assert cc.W_enc_stacked.shape == (3, 8, 20) and cc.W_dec_stacked.shape == (20, 3, 8)
    # stacked views are the per-hook blocks of seed 001's [H, d, d_sae] / [d_sae, H, d] layout
    assert torch.equal(cc.W_enc_stacked[1], cc.W_enc[8:16])
    assert torch.equal(cc.W_dec_stacked[:, 2], cc.W_dec[:, 16:24])
    x = torch.randn(5, 24)
    acts = cc.encode(x)
    assert acts.shape == (5, 20) and (acts >= 0).all()
    # acts = ReLU(sum_h x_h W_enc[h] + b_enc)
    by_hook = sum(xh @ w for xh, w in zip(cc.split(x), cc.W_enc_stacked, strict=True))
    torch.testing.assert_close(acts, torch.relu(by_hook + cc.b_enc))
    assert cc(x).shape == (5, 24)


def test_different_d_in_per_hook():
    cc = _perturbed("crosscoder", [3, 7], 6, {})
    assert cc.d_in == 10
    assert [b.shape for b in cc.W_enc_blocks()] == [(3, 6), (7, 6)]
    assert [b.shape for b in cc.W_dec_blocks()] == [(6, 3), (6, 7)]
    x = torch.randn(4, 10)
    acts = cc.encode(x)
    x_hat = cc.decode(acts)
    # x_hat_h = acts W_dec[:, h] + b_dec_h, hook by hook
    for h, (w, b) in enumerate(zip(cc.W_dec_blocks(), torch.split(cc.b_dec, [3, 7]), strict=True)):
        torch.testing.assert_close(cc.split(x_hat)[h], acts @ w + b)
    batch = {"h1": x[:, 3:], "h0": x[:, :3], "other": torch.zeros(4, 2)}
    assert torch.equal(cc.inputs(batch), x)  # hook order, not dict order
    with pytest.raises(UserError, match="no activations for input hooks"):
        cc.inputs({"h0": x[:, :3]})
    with pytest.raises(UserError, match="do not match"):
        cc.inputs({"h0": x[:, :3], "h1": x[:, 4:]})
    norms = cc.decoder_norms()
    assert norms.shape == (6, 2)
    torch.testing.assert_close(norms[:, 1], cc.W_dec[:, 3:].norm(dim=1))
    with pytest.raises(UserError, match="different d_in"):
        _ = cc.W_dec_stacked


def test_loss_weights_l1_by_sum_of_per_hook_decoder_norms():
    """Hand computation on a 2-latent crosscoder over hooks of width 1 and 2."""
    cc = build_crosscoder("crosscoder", [1, 2], ["a", "b"], 2,
                          {"l1_coefficient": 0.5, "l1_warmup_fraction": 0.0}, seed=0)
    with torch.no_grad():
        cc.W_enc.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))  # [D=3, d_sae=2]
        cc.b_enc.copy_(torch.tensor([0.0, -1.0]))
        cc.W_dec.copy_(torch.tensor([[3.0, 0.0, 4.0], [0.0, 6.0, 8.0]]))  # [d_sae=2, D=3]
        cc.b_dec.copy_(torch.tensor([0.5, 0.0, -0.5]))
    x = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    # acts: row 0 -> [1, 2-1=1]; row 1 -> [3, 3-1=2]
    acts = torch.tensor([[1.0, 1.0], [3.0, 2.0]])
    # per-hook decoder norms: latent 0 -> |3| + |4| = 7; latent 1 -> |0| + ||(6, 8)|| = 10
    penalty = ((1 * 7 + 1 * 10) + (3 * 7 + 2 * 10)) / 2
    x_hat = acts @ cc.W_dec.detach() + cc.b_dec.detach()
    recon = sum(float(((x_hat[i] - x[i]) ** 2).sum()) for i in range(2)) / 2
    out = cc.training_forward(x, TrainProgress(step=0, total_steps=10, tokens_seen=0))
    torch.testing.assert_close(out.acts, acts)
    assert math.isclose(float(out.parts["l1"]), penalty, rel_tol=1e-6)  # parts are unweighted
    assert math.isclose(float(out.parts["mse"]), recon, rel_tol=1e-6)
    assert math.isclose(float(out.loss.detach()), recon + 0.5 * penalty, rel_tol=1e-6)


def test_l1_warmup_is_linear_over_the_fraction():
    cc = build_crosscoder("crosscoder", [4, 4], ["a", "b"], 8,
                          {"l1_coefficient": 2.0, "l1_warmup_fraction": 0.1}, seed=0)
    # the one warm-up scheduler (SAELens' convention): (step + 1) / warm-up steps of the value
    at = [cc.coefficient_at("l1", TrainProgress(s, 1000, 0)) for s in (0, 49, 99, 500)]
    assert at == [0.02, 1.0, 2.0, 2.0]
    x = torch.randn(16, 8)
    out = cc.training_forward(x, TrainProgress(0, 1000, 0))
    torch.testing.assert_close(out.loss, out.parts["mse"] + 0.02 * out.parts["l1"])


def test_init_flattened_decoder_norm_and_transpose():
    cc = build_crosscoder("crosscoder", [5, 11], ["a", "b"], 32, {"dec_init_norm": 0.08}, seed=3)
    torch.testing.assert_close(cc.W_dec.norm(dim=1), torch.full((32,), 0.08))
    # per-hook blocks are NOT each 0.08 (seed 001: per-hook 0.1 went badly)
    assert not torch.allclose(cc.decoder_norms()[:, 0], torch.full((32,), 0.08), atol=1e-3)
    assert torch.equal(cc.W_enc, cc.W_dec.T)
    assert not cc.b_enc.any() and not cc.b_dec.any()
    same = build_crosscoder("crosscoder", [5, 11], ["a", "b"], 32, {"dec_init_norm": 0.08}, seed=3)
    other = build_crosscoder("crosscoder", [5, 11], ["a", "b"], 32, {"dec_init_norm": 0.08}, seed=4)
    assert torch.equal(cc.W_dec, same.W_dec) and not torch.equal(cc.W_dec, other.W_dec)


@pytest.mark.parametrize("arch, params", [("crosscoder", {}), ("crosscoder_topk", {"k": 3})])
def test_fold_per_hook_input_scaling(arch, params):
    cc = _perturbed(arch, [3, 5, 4], 12, params)
    scales = [2.0, 0.25, 7.0]
    folded = _perturbed(arch, [3, 5, 4], 12, params)
    folded.fold_input_scaling(scales)
    x = torch.randn(9, 12)
    col = torch.repeat_interleave(torch.tensor(scales), torch.tensor([3, 5, 4]))
    # folded(x) == crosscoder(x * scale) / scale, hook by hook; latents unchanged
    torch.testing.assert_close(folded.encode(x), cc.encode(x * col))
    out_scaled, out_folded = cc(x * col), folded(x)
    for h, s in enumerate(scales):
        torch.testing.assert_close(folded.split(out_folded)[h], cc.split(out_scaled)[h] / s)
    one = _perturbed(arch, [3, 5, 4], 12, params)
    one.fold_input_scaling(2.0)  # a single float applies to every hook
    torch.testing.assert_close(one(x), cc(x * 2.0) / 2.0)
    with pytest.raises(UserError, match="one scale per hook"):
        one.fold_input_scaling([1.0, 2.0])
    with pytest.raises(UserError, match="finite and > 0"):
        one.fold_input_scaling([1.0, 0.0, 1.0])


def test_topk_keeps_k_largest_and_has_no_penalty():
    cc = _perturbed("crosscoder_topk", [6, 6], 16, {"k": 4})
    assert isinstance(cc, TopKCrosscoder) and cc.arch == "crosscoder_topk"
    x = torch.randn(32, 12)
    acts, pre = cc.encode(x), cc.pre_acts(x)
    assert ((acts > 0).sum(dim=1) <= 4).all()
    top4 = pre.topk(4, dim=1)
    torch.testing.assert_close(acts.gather(1, top4.indices), torch.relu(top4.values))
    out = cc.training_forward(x, TrainProgress(5, 10, 0))
    assert set(out.parts) == {"mse", "aux"} and float(out.parts["aux"]) == 0.0  # none dead yet
    torch.testing.assert_close(out.loss, (cc(x) - x).pow(2).sum(-1).mean())


@pytest.mark.parametrize(
    "arch, splits, hooks, d_sae, params, match",
    [
        ("crosscoder_x", [4, 4], ["a", "b"], 8, {}, "unknown architecture 'crosscoder_x'"),
        ("crosscoder", [], [], 8, {}, "needs input hooks"),
        ("crosscoder", [4, 4], ["a"], 8, {}, "2 splits"),
        ("crosscoder", [4, 4], ["a", "a"], 8, {}, "duplicate hook names"),
        ("crosscoder", [4, 0], ["a", "b"], 8, {}, "positive widths"),
        ("crosscoder", [4, 4], ["a", "b"], 0, {}, "width must be an integer >= 1"),
        ("crosscoder", [4, 4], ["a", "b"], 8, {"k": 2}, "k does not apply"),
        ("crosscoder", [4, 4], ["a", "b"], 8, {"l1_coefficient": -1.0}, "--l1 must be >= 0"),
        ("crosscoder", [4, 4], ["a", "b"], 8, {"l1_warmup_fraction": 1.0}, "l1_warmup_fraction"),
        ("crosscoder", [4, 4], ["a", "b"], 8, {"dec_init_norm": 0.0}, "dec_init_norm must be > 0"),
        ("crosscoder_topk", [4, 4], ["a", "b"], 8, {"k": 9}, "larger than the width"),
        ("crosscoder_topk", [4, 4], ["a", "b"], 8, {"k": 0}, "--k must be >= 1"),
        ("crosscoder_topk", [4, 4], ["a", "b"], 8, {"l1_coefficient": 1.0}, "does not apply"),
    ],
)
def test_bad_configs_raise_user_error(arch, splits, hooks, d_sae, params, match):
    with pytest.raises(UserError, match=match):
        build_crosscoder(arch, splits, hooks, d_sae, params, seed=0)


def test_arch_params_and_registry():
    assert arch_params("crosscoder") == {"l1_coefficient", "l1_warmup_fraction", "dec_init_norm"}
    assert arch_params("crosscoder_topk") == {"k", "k_aux", "aux_coefficient",
                                              "dead_tokens_threshold", "aux_normalize",
                                              "dec_init_norm"}
    assert type(build_crosscoder("crosscoder", [2], ["a"], 2, {}, 0)) is Crosscoder


# --- metrics ------------------------------------------------------------------------------------
def test_crosscoder_metrics_per_hook():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g)
    x_hat = x.clone()
    x_hat[:, 2:] = 0.0  # hook 0 (2 dims) perfect, hook 1 (3 dims) predicted as zero
    acts = torch.zeros(64, 7)
    acts[:, :3] = 1.0
    m = crosscoder_metrics(x, x_hat, acts, [2, 3], hooks=["base", "chat"])
    x1 = x[:, 2:]
    assert m["fvu/base"] == 0.0 and m["mse/base"] == 0.0
    expect = float(x1.pow(2).sum() / (x1 - x1.mean(0)).pow(2).sum())
    assert math.isclose(m["fvu/chat"], expect, rel_tol=1e-5)
    assert math.isclose(m["mse/chat"], float(x1.pow(2).mean()), rel_tol=1e-5)
    assert m["l0"] == 3.0
    assert math.isclose(m["fvu"], float(x1.pow(2).sum() / (x - x.mean(0)).pow(2).sum()),
                        rel_tol=1e-5)
    assert {"fvu/0", "fvu/1"} <= set(crosscoder_metrics(x, x_hat, acts, [2, 3]))


def test_relative_decoder_norms_by_hand():
    W_dec = torch.tensor([
        [3.0, 4.0, 0.0, 0.0],  # only hook a -> 0
        [0.0, 0.0, 1.0, 0.0],  # only hook b -> 1
        [1.0, 0.0, 0.0, 1.0],  # equal -> 0.5
        [0.0, 3.0, 1.0, 0.0],  # 1 / (3 + 1) = 0.25
        [0.0, 0.0, 0.0, 0.0],  # no decoder at all -> NaN
    ])
    rel = relative_decoder_norms(W_dec, [2, 2])
    torch.testing.assert_close(rel[:4], torch.tensor([0.0, 1.0, 0.5, 0.25]))
    assert math.isnan(float(rel[4]))
    # a stacked [d_sae, H, d] decoder gives the same; swapping a and b mirrors the values
    torch.testing.assert_close(relative_decoder_norms(W_dec.view(5, 2, 2), [2, 2]), rel,
                               equal_nan=True)
    torch.testing.assert_close(relative_decoder_norms(W_dec, [2, 2], a=1, b=0)[:4], 1 - rel[:4])
    # undoing folded scales: hook b's decoder was divided by 3, so latent 2 reads 0.5 again
    folded = W_dec.clone()
    folded[:, 2:] /= 3.0
    torch.testing.assert_close(relative_decoder_norms(folded, [2, 2], input_scales=[1.0, 3.0])[:4],
                               rel[:4])
    with pytest.raises(UserError, match="out of range"):
        relative_decoder_norms(W_dec, [2, 2], b=2)
    with pytest.raises(UserError, match="sum to 5"):
        relative_decoder_norms(W_dec, [2, 3])


def test_plot_relative_norms(tmp_path):
    values = torch.cat([torch.full((30,), 0.02), torch.full((20,), 0.97), torch.rand(50) * 0.4 + 0.3,
                        torch.tensor([float("nan")])])
    path = plot_relative_norms(values, tmp_path / "rel.png", labels=("base", "chat"))
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400
    assert img[..., :3].std() > 0.05  # not a blank canvas
    assert [p.name for p in tmp_path.iterdir()] == ["rel.png"]  # no temporary left behind
    with pytest.raises(UserError, match="does not exist"):
        plot_relative_norms(values, tmp_path / "missing" / "rel.png")
