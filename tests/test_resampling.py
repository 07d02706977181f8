"""Anthropic resampling: dead latents are revived from high-loss inputs and their Adam state reset."""

import torch
from synthetic import make_sparse_data

from train_sae.dictionaries import build_sae
from train_sae.training.resampling import ENCODER_NORM_FACTOR, BatchPool, resample_dead


def test_dead_latents_fire_again_and_adam_state_is_reset():
    torch.manual_seed(0)
    x, _ = make_sparse_data(1024, 16, 32, 3, seed=1)
    sae = build_sae("relu", 16, 48, {"l1_coefficient": 0.1}, seed=0)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    for _ in range(3):  # give Adam non-zero moments everywhere
        opt.zero_grad()
        sae.training_forward(x[:256], None).loss.backward()
        opt.step()
    dead = torch.zeros(48, dtype=torch.bool)
    dead[::4] = True
    with torch.no_grad():
        sae.b_enc[dead] = -1e4  # force them dead
    assert (sae.encode(x)[:, dead] == 0).all()
    alive_before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    norm_alive = sae.W_enc.detach()[:, ~dead].norm(dim=0).mean()

    n = resample_dead(sae, opt, dead, x, torch.Generator().manual_seed(0))

    assert n == 12
    fired = (sae.encode(x)[:, dead] > 0).any(dim=0)
    assert fired.all(), "every resampled latent fires on some input again"
    assert torch.allclose(sae.W_dec[dead].norm(dim=1), torch.ones(12), atol=1e-5)
    enc_norms = sae.W_enc[:, dead].norm(dim=0)
    assert torch.allclose(enc_norms, torch.full((12,), float(ENCODER_NORM_FACTOR * norm_alive)),
                          rtol=1e-4)
    assert (sae.b_enc[dead] == 0).all()
    # decoder rows are inputs from the pool (normalised)
    unit_x = x / x.norm(dim=1, keepdim=True)
    assert ((sae.W_dec[dead] @ unit_x.T).max(dim=1).values > 0.9999).all()
    # alive latents untouched
    assert torch.equal(sae.W_dec[~dead], alive_before["W_dec"][~dead])
    assert torch.equal(sae.b_enc[~dead], alive_before["b_enc"][~dead])
    for p, index in ((sae.W_dec, dead), (sae.b_enc, dead)):
        st = opt.state[p]
        assert (st["exp_avg"][index] == 0).all() and (st["exp_avg_sq"][index] == 0).all()
        assert (st["exp_avg_sq"][~index] != 0).any()
    st = opt.state[sae.W_enc]
    assert (st["exp_avg"][:, dead] == 0).all() and (st["exp_avg_sq"][:, dead] == 0).all()
    assert (st["exp_avg_sq"][:, ~dead] != 0).any()


def test_sampling_prefers_high_loss_inputs():
    sae = build_sae("relu", 4, 8, {"l1_coefficient": 0.1}, seed=0)
    opt = torch.optim.Adam(sae.parameters())
    with torch.no_grad():
        sae.W_dec.zero_()  # reconstruction = b_dec = 0, so loss = ||x||^2
    x = torch.zeros(100, 4)
    x[:, 0] = 0.01
    x[7] = torch.tensor([0.0, 0.0, 5.0, 0.0])  # the one input with large loss
    dead = torch.ones(8, dtype=torch.bool)
    resample_dead(sae, opt, dead, x, torch.Generator().manual_seed(0))
    # p ~ loss^2: 625 vs 1e-8 per small row, so row 7 is drawn once and then the rest
    picked = (sae.W_dec[:, 2] > 0.99).sum()
    assert picked == 1


def test_no_dead_latents_changes_nothing():
    sae = build_sae("relu", 4, 8, {"l1_coefficient": 0.1}, seed=0)
    before = sae.W_dec.detach().clone()
    n = resample_dead(sae, torch.optim.Adam(sae.parameters()), torch.zeros(8, dtype=torch.bool),
                      torch.randn(10, 4), torch.Generator())
    assert n == 0 and torch.equal(before, sae.W_dec)


def test_pool_keeps_only_recent_rows():
    pool = BatchPool(max_rows=10)
    for i in range(6):
        pool.add(torch.full((4, 2), float(i)))
    rows = pool.rows()
    assert rows.shape == (10, 2)
    assert rows[:, 0].tolist() == [3.0, 3.0, 4.0, 4.0, 4.0, 4.0, 5.0, 5.0, 5.0, 5.0]
    assert pool.n_rows == 12  # at most one batch beyond the bound is held
