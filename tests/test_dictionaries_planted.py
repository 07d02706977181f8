"""Planted-structure tests for transcoders, skip transcoders, cross-layer transcoders and
Matryoshka SAEs: each is trained with a minimal Adam loop (the trainer's step: forward, backward,
before/after the optimizer step) on synthetic data whose features are known, and must find them
measurably better than a baseline: an untrained dictionary, the best linear map, or the plain
architecture next to it. Thresholds were measured on these seeds and leave a margin (the
measured values are in the comments)."""

from __future__ import annotations

import pytest
import torch
from synthetic import (
    make_clt_data,
    make_hierarchical_data,
    make_transcoder_data,
    mean_max_cosine,
)

from train_sae.dictionaries import IO, TrainProgress, build, build_sae
from train_sae.dictionaries.base import mse_per_token


def train(model, x: torch.Tensor, y: torch.Tensor | None = None, *, steps: int, lr: float,
          batch: int = 256, seed: int = 0):
    """`steps` Adam steps on random batches of rows of x (predicting y, default x); eval mode."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        target = None if y is None else y[idx]
        out = model.training_forward(x[idx], TrainProgress(step, steps, step * batch), target)
        opt.zero_grad()
        out.loss.backward()
        model.before_optimizer_step()
        opt.step()
        model.after_optimizer_step()
    return model.eval()


def fvu(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    """Fraction of variance unexplained: 1 for predicting the mean, 0 for a perfect fit."""
    return ((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum()).item()


def predict(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.decode(model.encode(x), x)


def linear_fit(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares y ~ x @ M^T + c: (M [d_out, d_in], c [d_out])."""
    ones = torch.ones(len(x), 1)
    sol = torch.linalg.lstsq(torch.cat([x, ones], dim=1), y).solution  # [d_in + 1, d_out]
    return sol[:-1].T, sol[-1]


def split(*ts: torch.Tensor, n_test: int = 2048) -> list[torch.Tensor]:
    """Each tensor -> (train rows, held-out rows)."""
    return [part for t in ts for part in (t[:-n_test], t[-n_test:])]


# --- transcoder --------------------------------------------------------------------------------
# 24 features in superposition in a 16-d input (so no linear map decodes them: the best one
# leaves FVU 0.36), each written to its own direction of a 24-d output; ~2 fire per row
TC_IN, TC_OUT, TC_FEATURES = 16, 24, 24


@pytest.fixture(scope="module")
def transcoder_data():
    x, y, _, dirs_out, _ = make_transcoder_data(12_000, TC_IN, TC_OUT, TC_FEATURES, n_active=2,
                                                seed=1)
    return (*split(x, y), dirs_out)


def test_transcoder_recovers_output_directions(transcoder_data):
    x_train, x_test, y_train, y_test, dirs_out = transcoder_data
    io = IO.of({"in": TC_IN}, {"out": TC_OUT})
    M, c = linear_fit(x_train, y_train)
    linear_fvu = fvu(y_test, x_test @ M.T + c)  # measured 0.356

    untrained = build("transcoder", io, 64, {"k": 4}, seed=0)
    assert mean_max_cosine(untrained.W_dec, dirs_out) < 0.6  # measured 0.451
    tc = train(build("transcoder", io, 64, {"k": 4}, seed=0), x_train, y_train,
               steps=500, lr=1e-2)
    assert mean_max_cosine(tc.W_dec, dirs_out) > 0.95  # measured 0.991
    tc_fvu = fvu(y_test, predict(tc, x_test))  # measured 0.105
    assert tc_fvu < 0.15
    assert tc_fvu < 0.5 * linear_fvu


def test_relu_l1_transcoder_predicts_the_output(transcoder_data):
    x_train, x_test, y_train, y_test, dirs_out = transcoder_data
    io = IO.of({"in": TC_IN}, {"out": TC_OUT})
    tc = train(build("transcoder", io, 64, {"l1_coefficient": 0.3}, seed=0), x_train, y_train,
               steps=800, lr=3e-3)
    assert tc.sparsity == "relu"
    with torch.no_grad():
        acts = tc.encode(x_test)
    assert fvu(y_test, tc.decode(acts, x_test)) < 0.25  # measured 0.142; the mean: 1.0
    assert (acts > 0).float().sum(dim=1).mean() < 10  # measured L0 5.1 of 64 latents
    assert mean_max_cosine(tc.W_dec, dirs_out) > 0.9  # measured 0.988


# --- skip transcoder ---------------------------------------------------------------------------
def test_skip_transcoder_recovers_the_linear_part():
    # y = sparse part + x @ A^T. W_skip is identified only by what the sparse latents cannot
    # explain: the dense Gaussian part of x (noise 0.3 per coordinate), which A maps to y
    d_in, d_out = 32, 24
    x, y, _, _, A = make_transcoder_data(12_000, d_in, d_out, 32, n_active=1.5, seed=1,
                                         noise=0.3, linear=1.0)
    x_train, x_test, y_train, y_test = split(x, y)
    io = IO.of({"in": d_in}, {"out": d_out})
    skip = train(build("skip_transcoder", io, 64, {"k": 4}, seed=0), x_train, y_train,
                 steps=400, lr=1e-2, batch=512)
    plain = train(build("transcoder", io, 64, {"k": 4}, seed=0), x_train, y_train,
                  steps=400, lr=1e-2, batch=512)

    error = ((skip.W_skip - A).norm() / A.norm()).item()  # measured 0.123; W_skip = 0: 1.0
    assert error < 0.2
    M, _ = linear_fit(x_train, y_train)  # the best linear map mixes the sparse part into A
    assert error < 0.6 * ((M - A).norm() / A.norm()).item()  # measured 0.324
    skip_fvu, plain_fvu = fvu(y_test, predict(skip, x_test)), fvu(y_test, predict(plain, x_test))
    assert skip_fvu < 0.2  # measured 0.124
    assert plain_fvu > 2 * skip_fvu  # measured 0.371


# --- cross-layer transcoder --------------------------------------------------------------------
def test_clt_puts_planted_features_on_their_layers():
    d, e, n_each, width = 16, 16, 8, 48
    xs, ys, features, codes = make_clt_data(12_000, d, e, n_each, fire_prob=0.08, seed=1)
    x_train, x_test, y_train, y_test, _, codes_test = split(torch.cat(xs, 1), torch.cat(ys, 1),
                                                            codes)
    io = IO.of({"x0": d, "x1": d}, {"y0": e, "y1": e})
    n = width // 2  # latents per layer: 0..n-1 read x0, n..2n-1 read x1

    untrained = build("clt", io, width, {"k": 4}, seed=0)
    with torch.no_grad():
        norms = untrained.decoder_norms()
    # a fresh layer-0 latent writes about as much to y1 as to y0: the check below can fail
    assert (norms[:n, 1] / norms[:n, 0]).median() > 0.5

    clt = train(build("clt", io, width, {"k": 4}, seed=0), x_train, y_train, steps=600, lr=1e-2)
    with torch.no_grad():
        acts = clt.encode(x_test)
        assert fvu(y_test, clt.decode(acts, x_test)) < 0.05  # measured 0.009
        norms = clt.decoder_norms()  # [width, 2]
    # each planted feature's latent: the one whose activations correlate best with its codes
    a = acts - acts.mean(0)
    c = codes_test - codes_test.mean(0)
    corr = (c / c.norm(dim=0)).T @ (a / a.norm(dim=0).clamp_min(1e-12))  # [features, width]
    best, latent = corr.max(dim=1)
    assert best.min() > 0.9  # measured 0.98
    ratio = norms[latent, 1] / norms[latent, 0].clamp_min(1e-12)  # y1 norm / y0 norm
    early, both, late = (features["kind"] == kind for kind in range(3))
    # early: read x0, write y0 only (measured y1/y0 at most 0.05)
    assert (latent[early] < n).all()
    assert ratio[early].max() < 0.25
    # both: read x0, write y0 and y1 equally (measured 0.96 to 1.01)
    assert (latent[both] < n).all()
    assert ratio[both].min() > 0.6 and ratio[both].max() < 1.6
    # late: read x1, so layer 1's latents, which cannot write y0
    assert (latent[late] >= n).all()
    assert (norms[latent[late], 0] == 0).all()


# --- Matryoshka BatchTopK ----------------------------------------------------------------------
def test_matryoshka_first_group_keeps_the_parent_features():
    # 4 parents, each firing in 40% of rows, always with one of its 6 children: k = 2 is too
    # few for parent + child separately (3.2 features a row), so a plain BatchTopK SAE absorbs
    # each parent into its children's latents (parent + child directions), while the
    # Matryoshka SAE's first 4 latents must reconstruct x alone and so learn the parents
    d, width, g = 32, 64, 4
    x, parents, _ = make_hierarchical_data(12_000, d, n_parents=g, n_children=6,
                                           parent_prob=0.4, seed=1)
    x_train, x_test = split(x)
    params = {"k": 2, "dead_tokens_threshold": 2560}  # AuxK on after 10 steps, for both
    mat = train(build_sae("matryoshka_batchtopk", d, width,
                          {**params, "matryoshka_widths": [g, width]}, seed=0),
                x_train, steps=1000, lr=3e-3)
    btk = train(build_sae("batchtopk", d, width, params, seed=0), x_train, steps=1000, lr=3e-3)

    def fvu_with(sae, latents: torch.Tensor) -> float:
        """FVU of reconstructing x_test from only these latents (the others zeroed)."""
        with torch.no_grad():
            acts = sae.encode(x_test)[:, latents]
            return fvu(x_test, acts @ sae.W_dec[latents] + sae.b_dec)

    with torch.no_grad():
        most_frequent = (btk.encode(x_train) > 0).float().mean(0).topk(g).indices
    prefix_fvu = fvu_with(mat, torch.arange(g))  # measured 0.453 (parents only: 0.35)
    btk_fvu = fvu_with(btk, most_frequent)  # measured 0.997
    assert prefix_fvu < 0.7 * btk_fvu
    assert prefix_fvu < 0.6
    # the first group holds the parent directions, which BatchTopK has absorbed
    assert mean_max_cosine(mat.W_dec[:g], parents) > 0.9  # measured 0.96
    assert mean_max_cosine(btk.W_dec, parents) < 0.9  # measured 0.84 (over all 64 latents)
    # both reconstruct x as a whole (measured FVU 0.17 and 0.06)
    assert fvu_with(mat, torch.arange(width)) < 0.3
    assert fvu_with(btk, torch.arange(width)) < 0.15


def test_matryoshka_loss_is_the_sum_of_its_parts():
    d, width, g, aux = 16, 64, 8, 0.25
    # a latent is dead once it has not fired for 1 token: the latents that did not fire in a
    # first batch of 4 rows (at most 4 x 4 of 64 fire) are dead in the second, so AuxK is on
    sae = build_sae("matryoshka_batchtopk", d, width,
                    {"k": 4, "matryoshka_widths": [g, width], "dead_tokens_threshold": 1,
                     "aux_coefficient": aux}, seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a b_dec that is not 0, so that every reconstruction must add it
        sae.b_dec.copy_(torch.randn(d, generator=gen))
    sae.training_forward(torch.randn(4, d, generator=gen))
    assert sae.dead_mask().sum() >= width - 16
    x = torch.randn(64, d, generator=gen)
    out = sae.training_forward(x, TrainProgress(1, 10, 64))
    assert set(out.parts) == {"mse", "aux", "matryoshka"}
    parts = {name: t.item() for name, t in out.parts.items()}
    assert parts["aux"] > 0
    assert out.loss.item() == pytest.approx(parts["mse"] + parts["matryoshka"]
                                            + aux * parts["aux"], rel=1e-5)
    with torch.no_grad():  # the parts are the outer and inner reconstruction errors
        prefix = out.acts[:, :g] @ sae.W_dec[:g] + sae.b_dec
        assert parts["matryoshka"] == pytest.approx(mse_per_token(x, prefix).item(), rel=1e-5)
        assert parts["mse"] == pytest.approx(mse_per_token(x, out.x_hat).item(), rel=1e-5)
        assert torch.allclose(out.x_hat, out.acts @ sae.W_dec + sae.b_dec, atol=1e-5)
