"""Splice evaluation: every metric against an independent computation on a tiny random model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformer_lens import HookedTransformer, HookedTransformerConfig

from train_sae.dictionaries.base import IO, SAE
from train_sae.evaluation.evaluate import (
    ReconStats,
    SpliceTarget,
    hook_means,
    kl_divergence,
    loss_recovered,
    next_token_ce,
    next_token_logprobs,
    splice_eval,
    start_layer,
)
from train_sae.evaluation.metrics import fvu as metrics_fvu


class IdentitySAE(SAE):
    """A perfect reconstruction: latents are the input itself."""

    arch = "identity"

    def __init__(self, d_in: int, d_sae: int):
        super().__init__(IO.same({"x": d_in}), d_sae, None)

    def encode(self, x):
        return x

    def decode(self, acts, x=None):
        return acts


class RandomReluSAE(SAE):
    """A fixed random ReLU SAE, so splicing changes the model's output."""

    arch = "random"

    def __init__(self, d_in: int, d_sae: int, seed: int):
        super().__init__(IO.same({"x": d_in}), d_sae, None)
        g = torch.Generator().manual_seed(seed)
        self.W_enc = torch.randn(d_in, d_sae, generator=g) / d_in**0.5
        self.b_enc = torch.randn(d_sae, generator=g) * 0.1 - 0.2
        self.W_dec = torch.randn(d_sae, d_in, generator=g) / d_sae**0.5

    def encode(self, x):
        return torch.relu(x @ self.W_enc + self.b_enc)

    def decode(self, acts, x=None):
        return acts @ self.W_dec


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=16, n_ctx=12, d_head=4, n_heads=4, d_mlp=32, d_vocab=40,
        act_fn="gelu", normalization_type="LN", seed=3,
    )
    return HookedTransformer(cfg).eval()


@pytest.fixture(scope="module")
def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 40, (6, 12), generator=g)
    keep = torch.ones_like(tokens, dtype=torch.bool)
    return [(tokens[:4], keep[:4]), (tokens[4:], keep[4:])]


def _all(batches):
    return torch.cat([t for t, _ in batches])


def _loss_with(model, tokens, hook, fn):
    return float(model.run_with_hooks(tokens, return_type="loss", fwd_hooks=[(hook, fn)]))


# --- formulas --------------------------------------------------------------------------------
def test_ce_and_kl_match_torch():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 7, generator=g)
    other = torch.randn(3, 5, 7, generator=g)
    tokens = torch.randint(0, 7, (3, 5), generator=g)
    logp = next_token_logprobs(logits)
    ce = next_token_ce(logp, tokens)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 7), tokens[:, 1:].reshape(-1),
                          reduction="none").reshape(3, 4)
    torch.testing.assert_close(ce, ref)
    kl = kl_divergence(logp, next_token_logprobs(other))
    p = torch.softmax(logits[:, :-1], -1)
    q = torch.softmax(other[:, :-1], -1)
    torch.testing.assert_close(kl, (p * (p / q).log()).sum(-1))
    assert kl.min() > 0 and kl_divergence(logp, logp).abs().max() < 1e-6


def test_loss_recovered_by_hand():
    assert loss_recovered(3.0, 2.0, 6.0) == pytest.approx(0.75)  # (6 - 3) / (6 - 2)
    assert loss_recovered(2.0, 2.0, 6.0) == 1.0
    assert loss_recovered(7.0, 2.0, 6.0) == pytest.approx(-0.25)
    assert math.isnan(loss_recovered(3.0, 2.0, 2.0))


def test_recon_stats_stream_equals_whole_batch():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, 6, generator=g) + 3.0
    x_hat = x + 0.3 * torch.randn(50, 6, generator=g)
    acts = torch.relu(torch.randn(50, 9, generator=g))
    stats = ReconStats()
    for i in range(0, 50, 15):
        stats.update(x[i:i + 15], x_hat[i:i + 15], acts[i:i + 15])
    assert stats.fvu == pytest.approx(float(metrics_fvu(x.double(), x_hat.double())), rel=1e-9)
    assert stats.l0 == pytest.approx(float((acts > 0).sum(1).float().mean()))


def test_start_layer():
    assert start_layer("blocks.3.hook_mlp_out", 4) == 3
    assert start_layer("ln_final.hook_normalized", 4) == 4
    assert start_layer("hook_embed", 4) is None


# --- splicing into a tiny model --------------------------------------------------------------
@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_pre", "blocks.0.hook_mlp_out",
                                  "hook_embed", "ln_final.hook_normalized"])
def test_identity_sae_recovers_everything(model, batches, hook):
    tokens = _all(batches)
    means = hook_means(model, [hook], batches)
    res = splice_eval(model, [SpliceTarget("id", hook, IdentitySAE(16, 16))], batches, means)["id"]
    clean = float(model(tokens, return_type="loss").detach())
    assert res["ce_clean"] == pytest.approx(clean, abs=1e-5)
    assert res["ce_sae"] == pytest.approx(clean, abs=1e-5)
    assert res["loss_recovered_zero"] == pytest.approx(1.0, abs=1e-4)
    assert res["loss_recovered_mean"] == pytest.approx(1.0, abs=1e-4)
    assert abs(res["kl"]) < 1e-6
    assert res["fvu"] == pytest.approx(0.0, abs=1e-9)
    assert res["n_tokens"] == tokens.numel() - tokens.shape[0]
    zero = _loss_with(model, tokens, hook, lambda a, hook: torch.zeros_like(a))
    assert res["ce_zero_ablation"] == pytest.approx(zero, abs=1e-5)
    assert abs(res["ce_zero_ablation"] - clean) > 0.01  # the baseline is a different number


def test_mean_ablation_and_hook_means(model, batches):
    hook = "blocks.0.hook_mlp_out"
    tokens = _all(batches)
    _, cache = model.run_with_cache(tokens, names_filter=hook)
    mean = cache[hook].reshape(-1, 16).mean(0)
    means = hook_means(model, [hook], batches)
    torch.testing.assert_close(means[hook], mean, atol=1e-6, rtol=1e-5)
    res = splice_eval(model, [SpliceTarget("id", hook, IdentitySAE(16, 16))], batches, means)
    ref = _loss_with(model, tokens, hook, lambda a, hook: mean.expand_as(a))
    assert res["id"]["ce_mean_ablation"] == pytest.approx(ref, abs=1e-5)


def test_random_sae_matches_run_with_hooks(model, batches):
    """Two SAEs at two hooks in one call: CE, KL, L0 and FVU against plain transformer_lens."""
    tokens = _all(batches)
    targets = [SpliceTarget("a", "blocks.1.hook_mlp_out", RandomReluSAE(16, 48, seed=0)),
               SpliceTarget("b", "blocks.0.hook_resid_post", RandomReluSAE(16, 32, seed=1))]
    means = {t.hook: torch.zeros(16) for t in targets}
    res = splice_eval(model, targets, batches, means)
    clean_logits = model(tokens)
    for t in targets:
        logits = model.run_with_hooks(tokens, fwd_hooks=[(t.hook, lambda a, hook, s=t.sae: s(a))])
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, 40), tokens[:, 1:].reshape(-1))
        kl = F.kl_div(torch.log_softmax(logits[:, :-1], -1), torch.log_softmax(clean_logits[:, :-1], -1),
                      log_target=True, reduction="none").sum(-1).mean()
        _, cache = model.run_with_cache(tokens, names_filter=t.hook)
        x = cache[t.hook].reshape(-1, 16)
        acts = t.sae.encode(x)
        r = res[t.name]
        assert r["ce_sae"] == pytest.approx(float(ce), abs=1e-5)
        assert r["kl"] == pytest.approx(float(kl), abs=1e-5)
        assert r["kl"] > 1e-3
        assert r["l0"] == pytest.approx(float((acts > 0).sum(1).float().mean()), abs=1e-6)
        assert r["fvu"] == pytest.approx(float(metrics_fvu(x, t.sae.decode(acts))), rel=1e-4)
        assert r["ce_zero_ablation"] == r["ce_mean_ablation"]  # zero means were passed
        expect = (r["ce_zero_ablation"] - r["ce_sae"]) / (r["ce_zero_ablation"] - r["ce_clean"])
        assert r["loss_recovered_zero"] == pytest.approx(expect)


def test_only_kept_positions_are_spliced_and_scored(model, batches):
    """BOS-like positions dropped from the store stay clean and are not scored as targets."""
    tokens = _all(batches)
    keep = torch.ones_like(tokens, dtype=torch.bool)
    keep[:, 0] = False
    keep[:, 5] = False
    hook = "blocks.1.hook_resid_pre"
    sae = RandomReluSAE(16, 32, seed=2)
    res = splice_eval(model, [SpliceTarget("r", hook, sae)], [(tokens, keep)],
                      {hook: torch.zeros(16)})["r"]

    def splice(a, hook):
        out = a.clone()
        out[keep] = sae(a[keep])
        return out

    logits = model.run_with_hooks(tokens, fwd_hooks=[(hook, splice)])
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, 40), tokens[:, 1:].reshape(-1), reduction="none")
    scored = keep[:, 1:].reshape(-1)
    assert res["n_tokens"] == int(scored.sum())
    assert res["ce_sae"] == pytest.approx(float(ce[scored].mean()), abs=1e-5)
