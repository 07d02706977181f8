"""Our saved folders load in SAELens (`SAE.load_from_disk`) and compute the same thing there.

Skipped unless the optional `sae_lens` package imports; pipelines/test_saelens.sh makes a venv
with it and runs this file.
"""

from __future__ import annotations

import pytest
import torch

from train_sae.dictionaries import IO, REGISTRY, TrainProgress, build, build_sae, io_kind
from train_sae.training.saving import save_sae

sae_lens = pytest.importorskip("sae_lens")
pytestmark = pytest.mark.saelens

SCALE = 1.7
SAELENS_CLASS = {"relu": "StandardSAE", "april": "StandardSAE", "topk": "TopKSAE",
                 "batchtopk": "JumpReLUSAE", "jumprelu": "JumpReLUSAE", "gated": "GatedSAE",
                 "matryoshka_batchtopk": "JumpReLUSAE"}
SAE_ARCHS = sorted(a for a in REGISTRY if io_kind(a) == "sae")
# (arch, sparsity) -> the SAELens class it loads as
TRANSCODER_CLASS = {
    ("transcoder", "relu"): "Transcoder", ("transcoder", "jumprelu"): "JumpReLUTranscoder",
    ("transcoder", "batchtopk"): "JumpReLUTranscoder",
    ("skip_transcoder", "relu"): "SkipTranscoder",
    ("skip_transcoder", "jumprelu"): "JumpReLUSkipTranscoder",
    ("skip_transcoder", "batchtopk"): "JumpReLUSkipTranscoder",
}


def train_a_little(model, x_scale: float, d_in: int, d_out: int | None = None, steps: int = 20):
    """A few real steps, so biases, thresholds and skips are not at their init."""
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(steps):
        x = x_scale * torch.randn(128, d_in, generator=gen)
        y = None if d_out is None else torch.randn(128, d_out, generator=gen) + x[:, :d_out]
        out = model.training_forward(x, TrainProgress(step, steps, step * 128), y)
        opt.zero_grad()
        out.loss.backward()
        model.before_optimizer_step()
        opt.step()
        model.after_optimizer_step()
    return model.eval()


@pytest.mark.parametrize("arch", SAE_ARCHS)
def test_saelens_loads_and_matches(tmp_path, arch):
    sae = train_a_little(build_sae(arch, 16, 40, {"k": 5} if "topk" in arch else {}, seed=0),
                         SCALE, 16)
    save_sae(sae, tmp_path, hook="blocks.0.hook_resid_pre", model="tiny", d_in=16,
             extra_cfg={"note": "interop"}, sparsity=torch.full((40,), -2.0), input_scale=SCALE)

    theirs = sae_lens.SAE.load_from_disk(str(tmp_path), device="cpu")
    assert type(theirs).__name__ == SAELENS_CLASS[arch]
    assert theirs.cfg.metadata.hook_name == "blocks.0.hook_resid_pre"
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours_acts = sae.encode(x * SCALE)
        ours_out = sae.decode(ours_acts) / SCALE
        their_acts = theirs.encode(x)
        assert (ours_acts > 0).sum() > 64
        torch.testing.assert_close(their_acts, ours_acts, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.decode(their_acts), ours_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch, sparsity", sorted(TRANSCODER_CLASS))
def test_saelens_loads_transcoders_and_matches(tmp_path, arch, sparsity):
    d_in, d_out, out_scale = 16, 12, 0.6
    tc = build(arch, IO.of({"blocks.0.ln2.hook_normalized": d_in}, {"blocks.0.hook_mlp_out": d_out}),
               40, {"sparsity": sparsity, **({"k": 5} if sparsity == "batchtopk" else {})}, 0)
    train_a_little(tc, SCALE, d_in, d_out)
    save_sae(tc, tmp_path, hook="blocks.0.ln2.hook_normalized", model="tiny", d_in=d_in,
             extra_cfg={}, sparsity=torch.full((40,), -2.0), input_scale=SCALE,
             out_hook="blocks.0.hook_mlp_out", output_scale=out_scale)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path), device="cpu")
    assert type(theirs).__name__ == TRANSCODER_CLASS[(arch, sparsity)]
    assert theirs.cfg.d_out == d_out
    x = torch.randn(64, d_in, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours_acts = tc.encode(x * SCALE)
        ours_out = tc(x * SCALE) / out_scale  # trained on y * out_scale
        assert (ours_acts > 0).sum() > 64
        torch.testing.assert_close(theirs.encode(x), ours_acts, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs(x), ours_out, rtol=1e-5, atol=1e-5)
