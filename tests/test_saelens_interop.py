"""Our saved folders load in SAELens (`SAE.load_from_disk`) and compute the same thing there.

Skipped unless the optional `sae_lens` package imports; pipelines/test_saelens.sh makes a venv
with it and runs this file.
"""

from __future__ import annotations

import pytest
import torch

from train_sae.dictionaries import REGISTRY, TrainProgress, build_sae
from train_sae.training.saving import save_sae

sae_lens = pytest.importorskip("sae_lens")
pytestmark = pytest.mark.saelens

SCALE = 1.7
SAELENS_CLASS = {"relu": "StandardSAE", "april": "StandardSAE", "topk": "TopKSAE",
                 "batchtopk": "JumpReLUSAE", "jumprelu": "JumpReLUSAE", "gated": "GatedSAE"}


@pytest.mark.parametrize("arch", sorted(REGISTRY))
def test_saelens_loads_and_matches(tmp_path, arch):
    sae = build_sae(arch, 16, 40, {"k": 5} if "topk" in arch else {}, seed=0)
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for step in range(20):  # a few real steps, so biases and thresholds are not at init
        out = sae.training_forward(SCALE * torch.randn(128, 16, generator=gen),
                                   TrainProgress(step, 20, step * 128))
        opt.zero_grad()
        out.loss.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()
    sae.eval()
    save_sae(sae, tmp_path, hook="blocks.0.hook_resid_pre", model="tiny", d_in=16,
             extra_cfg={"note": "interop"}, sparsity=torch.full((40,), -2.0), input_scale=SCALE)

    theirs = sae_lens.SAE.load_from_disk(str(tmp_path), device="cpu")
    assert type(theirs).__name__ == SAELENS_CLASS[arch]
    assert theirs.cfg.metadata.hook_name == "blocks.0.hook_resid_pre"
    x = torch.randn(64, 16, generator=gen)
    with torch.no_grad():
        ours_acts = sae.encode(x * SCALE)
        ours_out = sae.decode(ours_acts) / SCALE
        their_acts = theirs.encode(x)
        assert (ours_acts > 0).sum() > 64
        torch.testing.assert_close(their_acts, ours_acts, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.decode(their_acts), ours_out, rtol=1e-5, atol=1e-5)
