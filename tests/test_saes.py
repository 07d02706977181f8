"""Unit checks of every SAE architecture: configs, init, losses against hand computations,
decoder constraints and folding of the input scaling."""

from __future__ import annotations

import math
import re

import pytest
import torch

from shared.errors import UserError
from train_sae.dictionaries import REGISTRY, TrainProgress, arch_params, build_sae, io_kind
from train_sae.dictionaries.jumprelu import JumpReLUSAE

SAE_ARCHS = sorted(a for a in REGISTRY if io_kind(a) == "sae")  # one hook in, the same out

PROGRESS = TrainProgress(step=0, total_steps=100, tokens_seen=0)
SMALL = {"topk": {"k": 4}, "batchtopk": {"k": 4}, "matryoshka_batchtopk": {"k": 4}}


def make(arch: str, d_in: int = 16, d_sae: int = 48, seed: int = 0, **params):
    return build_sae(arch, d_in, d_sae, {**SMALL.get(arch, {}), **params}, seed)


def perturbed(arch: str, seed: int = 0):
    """An SAE whose weights are not at their symmetric init (biases non-zero, and so on)."""
    sae = make(arch, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    if "batchtopk" in arch:
        sae.training_forward(torch.randn(64, 16, generator=gen), PROGRESS)
    return sae


def test_registry_names_and_params():
    assert set(SAE_ARCHS) == {"relu", "april", "topk", "batchtopk", "jumprelu", "gated",
                              "matryoshka_batchtopk"}
    assert arch_params("relu") == {"l1_coefficient"}
    assert arch_params("april") == {"l1_coefficient", "l1_warmup_fraction"}
    topk = {"k", "k_aux", "aux_coefficient", "dead_tokens_threshold", "aux_normalize"}
    assert arch_params("topk") == topk
    assert arch_params("batchtopk") == topk | {"threshold_ema"}
    assert arch_params("jumprelu") == {"l0_coefficient", "bandwidth", "init_threshold"}
    assert arch_params("gated") == {"l1_coefficient"}
    assert arch_params("matryoshka_batchtopk") == topk | {"threshold_ema", "matryoshka_widths"}
    for arch, variants in REGISTRY.items():
        assert all(cls.arch == arch and cls.sparsity == s for s, cls in variants.items())


@pytest.mark.parametrize(
    ("arch", "d_sae", "params", "message"),
    [
        ("mlp", 8, {}, "unknown architecture 'mlp'; choose one of relu, april"),
        ("relu", 0, {}, "the width must be an integer >= 1"),
        ("relu", 8, {"k": 4}, "k does not apply to arch 'relu'"),
        ("topk", 8, {"l1_coefficient": 1.0}, "l1_coefficient does not apply to arch 'topk'"),
        ("relu", 8, {"l1_coefficient": -1.0}, "--l1 must be >= 0 (got -1.0)"),
        ("april", 8, {"l1_warmup_fraction": 1.5}, "l1_warmup_fraction must be >= 0 and < 1"),
        ("topk", 8, {"k": 0}, "--k must be >= 1 (got 0)"),
        ("topk", 8, {"k": 9}, "k=9 is larger than the width 8"),
        ("batchtopk", 8, {"k": 2.5}, "--k takes whole numbers, got 2.5"),
        ("topk", 8, {"k": 2, "k_aux": 0}, "--k-aux must be >= 1"),
        ("topk", 8, {"k": 2, "dead_tokens_threshold": 0}, "dead_tokens_threshold must be >= 1"),
        ("topk", 8, {"k": 2, "aux_normalize": "yes"}, "aux_normalize takes on/off values"),
        ("batchtopk", 8, {"k": 2, "threshold_ema": 2.0}, "threshold_ema must be >= 0 and <= 1"),
        ("jumprelu", 8, {"bandwidth": 0.0}, "bandwidth must be > 0"),
        ("jumprelu", 8, {"init_threshold": -1.0}, "init_threshold must be > 0"),
        ("gated", 8, {"l1_coefficient": math.nan}, "--l1 takes finite numbers, got nan"),
        ("matryoshka_batchtopk", 8, {"k": 2, "matryoshka_widths": [4, 2, 8]},
         "must increase strictly"),
        ("matryoshka_batchtopk", 8, {"k": 2, "matryoshka_widths": [2, 4]},
         "must end at the width 8"),
        ("matryoshka_batchtopk", 8, {"k": 2, "matryoshka_widths": [0, 8]}, "must be >= 1"),
    ],
)
def test_bad_params_are_user_errors(arch, d_sae, params, message):
    with pytest.raises(UserError, match=re.escape(message)):
        build_sae(arch, 4, d_sae, params, 0)


@pytest.mark.parametrize("arch", SAE_ARCHS)
def test_same_seed_same_init_other_seed_differs(arch):
    a, b, c = make(arch, seed=3), make(arch, seed=3), make(arch, seed=4)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.W_dec, c.W_dec)


@pytest.mark.parametrize("arch", SAE_ARCHS)
def test_init_shapes_and_tied_encoder(arch):
    sae = make(arch)
    assert sae.W_enc.shape == (16, 48) and sae.W_dec.shape == (48, 16)
    assert sae.b_dec.shape == (16,)
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    norms = sae.W_dec.norm(dim=1)
    expected = 0.1 if arch == "april" else 1.0
    torch.testing.assert_close(norms, torch.full_like(norms, expected))


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu", "gated",
                                  "matryoshka_batchtopk"])
def test_unit_norm_decoder_kept_through_adam_steps(arch):
    sae = make(arch)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    for step in range(5):
        out = sae.training_forward(x, TrainProgress(step, 5, step * 64))
        opt.zero_grad()
        out.loss.backward()
        sae.before_optimizer_step()
        # the gradient left on each decoder row is orthogonal to that row
        radial = (sae.W_dec.grad * sae.W_dec).sum(dim=1)
        assert radial.abs().max() < 1e-5
        opt.step()
        sae.after_optimizer_step()
    norms = sae.W_dec.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    assert not torch.equal(sae.W_enc, sae.W_dec.T)  # it did train


def test_relu_loss_is_mse_plus_l1():
    sae = perturbed("relu")
    x = torch.randn(8, 16)
    out = sae.training_forward(x, PROGRESS)
    acts = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    mse = ((acts @ sae.W_dec + sae.b_dec - x) ** 2).sum(1).mean()
    l1 = acts.sum(1).mean()
    torch.testing.assert_close(out.parts["mse"], mse)
    torch.testing.assert_close(out.loss, mse + 5.0 * l1)


def test_april_l1_weighted_by_decoder_norm_with_warmup():
    sae = build_sae("april", 16, 48, {"l1_coefficient": 2.0, "l1_warmup_fraction": 0.1}, 0)
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 3.0, 48)[:, None])
        sae.b_dec.fill_(7.0)  # april does not subtract b_dec from the input
    x = torch.randn(8, 16)
    acts = torch.relu(x @ sae.W_enc + sae.b_enc)
    torch.testing.assert_close(sae.encode(x), acts)
    mse = ((acts @ sae.W_dec + sae.b_dec - x) ** 2).sum(1).mean()
    l1 = (acts * sae.W_dec.norm(dim=1)).sum(1).mean()
    # warm-up over 10% of 1000 steps: (step + 1) / 100 of the final coefficient, then constant
    for step, coefficient in [(0, 0.02), (49, 1.0), (99, 2.0), (700, 2.0)]:
        out = sae.training_forward(x, TrainProgress(step, 1000, 0))
        torch.testing.assert_close(out.loss, mse + coefficient * l1)
    no_warmup = build_sae("april", 16, 48, {"l1_coefficient": 2.0, "l1_warmup_fraction": 0}, 0)
    assert no_warmup.coefficient_at("l1", TrainProgress(0, 1000, 0)) == 2.0


def test_topk_keeps_k_largest_positive():
    sae = perturbed("topk")
    x = torch.randn(32, 16)
    acts = sae.encode(x)
    pre = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    assert ((acts > 0).sum(1) <= 4).all()
    kth = pre.topk(4, dim=1).values[:, -1:]
    torch.testing.assert_close(acts, torch.where(pre >= kth, pre, torch.zeros_like(pre)))


def _auxk_by_hand(sae, x, dead, k_aux):
    """Reference AuxK with explicit loops (no topk/scatter)."""
    pre = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc).tolist()
    x_hat = sae.decode(sae.encode(x))
    dead_ids = [i for i in range(sae.d_sae) if dead[i]]
    total = 0.0
    for b in range(x.shape[0]):
        chosen = sorted(dead_ids, key=lambda i: -pre[b][i])[:min(k_aux, len(dead_ids))]
        recon = sum((pre[b][i] * sae.W_dec[i] for i in chosen), torch.zeros(sae.d_in))
        total += ((x[b] - x_hat[b]) - recon).pow(2).sum().item()
    return min(len(dead_ids) / k_aux, 1.0) * total / x.shape[0]


@pytest.mark.parametrize("n_dead", [2, 9])  # fewer dead latents than k_aux (scaled down), more
def test_auxk_matches_hand_computation(n_dead):
    params = {"k": 2, "k_aux": 4, "dead_tokens_threshold": 100, "aux_coefficient": 0.5}
    sae = build_sae("topk", 6, 12, params, 0)
    with torch.no_grad():
        sae.b_enc.fill_(0.3)  # make most pre-activations positive
        sae.b_dec.normal_()
    dead = torch.zeros(12, dtype=torch.bool)
    dead[torch.randperm(12, generator=torch.Generator().manual_seed(1))[:n_dead]] = True
    sae.tokens_since_fired[dead] = 100
    sae.tokens_since_fired[~dead] = 99
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(2))
    expected = _auxk_by_hand(sae, x, dead, k_aux=4)
    out = sae.training_forward(x, PROGRESS)
    assert expected > 0
    assert out.parts["aux"].item() == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(out.loss, out.parts["mse"] + 0.5 * out.parts["aux"])


def test_auxk_normalized_divides_by_residual_variance():
    params = {"k": 2, "k_aux": 3, "dead_tokens_threshold": 1}
    plain = build_sae("topk", 6, 12, params, 0)
    normed = build_sae("topk", 6, 12, {**params, "aux_normalize": True}, 0)
    for sae in (plain, normed):
        sae.tokens_since_fired[:6] = 5
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(0))
    a = plain.training_forward(x, PROGRESS).parts["aux"]
    b = normed.training_forward(x, PROGRESS).parts["aux"]
    residual = x - plain.decode(plain.encode(x))
    variance = (residual - residual.mean(0)).pow(2).sum(1).mean()
    torch.testing.assert_close(b, a / variance)


def test_auxk_residual_is_detached_and_only_dead_rows_learn():
    sae = build_sae("topk", 6, 12, {"k": 2, "dead_tokens_threshold": 1}, 0)
    sae.tokens_since_fired[:5] = 1  # latents 0..4 dead
    x = torch.randn(9, 6)
    pre_relu = torch.relu(sae.hidden_pre(x))
    x_hat = sae.decode(sae.select(pre_relu))
    sae.aux_loss(x - x_hat, pre_relu, sae.dead_mask()).backward()
    assert sae.W_dec.grad[:5].abs().sum() > 0
    # live rows would get a gradient through x_hat if the residual were not detached
    assert sae.W_dec.grad[5:].abs().sum() == 0
    assert sae.W_enc.grad[:, 5:].abs().sum() == 0


def test_dead_token_counter_updates_and_is_checkpointed():
    sae = build_sae("topk", 8, 16, {"k": 1, "dead_tokens_threshold": 10}, 0)
    x = torch.randn(4, 8)
    sae.training_forward(x, PROGRESS)
    fired = (sae.encode(x) > 0).any(0)
    assert (sae.tokens_since_fired[fired] == 0).all()
    assert (sae.tokens_since_fired[~fired] == 4).all()
    for _ in range(2):
        sae.training_forward(x, PROGRESS)
    assert (sae.tokens_since_fired[~fired] == 12).all()
    assert torch.equal(sae.dead_mask(), ~fired)
    state = sae.state_dict()
    fresh = build_sae("topk", 8, 16, {"k": 1, "dead_tokens_threshold": 10}, 0)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.tokens_since_fired, sae.tokens_since_fired)


def test_batchtopk_budget_and_threshold():
    sae = build_sae("batchtopk", 8, 32, {"k": 3, "threshold_ema": 0.5}, 0)
    with torch.no_grad():
        sae.b_enc.fill_(0.5)
    x = torch.randn(10, 8, generator=torch.Generator().manual_seed(0))
    out = sae.training_forward(x, PROGRESS)
    assert int((out.acts > 0).sum()) == 30  # k * batch over the whole batch
    first_min = out.acts[out.acts > 0].min()
    assert sae.threshold.item() == pytest.approx(first_min.item())
    x2 = 2 * torch.randn(10, 8, generator=torch.Generator().manual_seed(1))
    out2 = sae.training_forward(x2, PROGRESS)
    second_min = out2.acts[out2.acts > 0].min()
    assert sae.threshold.item() == pytest.approx(0.5 * first_min.item() + 0.5 * second_min.item())
    # at inference: JumpReLU with the learned threshold, token by token
    sae.eval()
    pre = sae.hidden_pre(x)
    torch.testing.assert_close(sae.encode(x), torch.relu(pre) * (pre > sae.threshold))
    torch.testing.assert_close(sae.encode(x[:1]), sae.encode(x)[:1])


def test_jumprelu_straight_through_gradients():
    eps = 0.2
    sae = build_sae("jumprelu", 4, 3, {"bandwidth": eps, "init_threshold": 0.5,
                                       "l0_coefficient": 1.0}, 0)
    pre = torch.tensor([[0.45, 0.7, 0.2], [0.58, 0.55, 0.62], [1.0, 0.42, 0.35]])
    with torch.no_grad():  # make hidden_pre(x) == pre for x = identity rows
        sae.W_enc.zero_()
        sae.W_enc[:3, :3] = pre
    x = torch.eye(4)[:3]
    torch.testing.assert_close(sae.hidden_pre(x), pre)
    out = sae.training_forward(x, PROGRESS)
    torch.testing.assert_close(out.acts, pre * (pre > 0.5))
    assert out.parts["l0"].item() == pytest.approx(5 / 3)
    # mse's gradient on acts, then the STE by hand: inside the window |pre - t| < eps/2
    sae.zero_grad()
    out.loss.backward()
    grad_acts = (2 * (out.x_hat - x) @ sae.W_dec.T / 3).detach()
    window = ((pre - 0.5).abs() < eps / 2).float() / eps
    d_threshold = (-(0.5 * window * grad_acts).sum(0)  # through the jump
                   - (window / 3).sum(0))  # through the L0 term, mean over batch
    torch.testing.assert_close(sae.log_threshold.grad, 0.5 * d_threshold)  # d theta/d log = theta


def test_gated_loss_by_hand():
    sae = perturbed("gated")
    x = torch.randn(6, 16)
    out = sae.training_forward(x, PROGRESS)
    xc = x - sae.b_dec
    gate = xc @ sae.W_enc + sae.b_gate
    mag = torch.relu(xc @ (sae.W_enc * sae.r_mag.exp()) + sae.b_mag)
    acts = (gate > 0) * mag
    torch.testing.assert_close(out.acts, acts)
    aux = ((torch.relu(gate) @ sae.W_dec + sae.b_dec - x) ** 2).sum(1).mean()
    torch.testing.assert_close(out.parts["aux"], aux)
    torch.testing.assert_close(out.parts["l1"], torch.relu(gate).sum(1).mean())


@pytest.mark.parametrize("arch", SAE_ARCHS)
def test_fold_input_scaling(arch):
    scale = 3.7
    sae = perturbed(arch).eval()
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        acts = sae.encode(x * scale)
        x_hat = sae.decode(acts) / scale
        sae.fold_input_scaling(scale)
        torch.testing.assert_close(sae.encode(x), acts, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae(x), x_hat, rtol=1e-5, atol=1e-5)
    assert (acts > 0).any()


def test_jumprelu_threshold_is_exp_log_threshold():
    sae = build_sae("jumprelu", 4, 8, {"init_threshold": 0.25}, 0)
    assert isinstance(sae, JumpReLUSAE)
    torch.testing.assert_close(sae.threshold, torch.full((8,), 0.25))


@pytest.mark.parametrize("arch", SAE_ARCHS)
def test_encode_is_per_token_whatever_the_leading_dims(arch):
    """Eval splices [batch, ctx, d] activations: each token is encoded on its own."""
    sae = perturbed(arch)
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), sae.encode(x.reshape(15, 16)).reshape(3, 5, -1))
