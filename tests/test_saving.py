"""Saved SAE folders: SAELens' layout, the input scaling folded in, exact round trips."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from shared.errors import UserError
from train_sae.dictionaries import REGISTRY, TrainProgress, build_sae, io_kind
from train_sae.training.saving import load_sae, save_sae

SAE_ARCHS = sorted(a for a in REGISTRY if io_kind(a) == "sae")
SCALE = 2.5
SAELENS_ARCH = {"relu": "standard", "april": "standard", "topk": "topk",
                "batchtopk": "jumprelu", "jumprelu": "jumprelu", "gated": "gated",
                "matryoshka_batchtopk": "jumprelu"}
WEIGHTS = {
    "standard": {"W_enc": (16, 40), "b_enc": (40,), "W_dec": (40, 16), "b_dec": (16,)},
    "topk": {"W_enc": (16, 40), "b_enc": (40,), "W_dec": (40, 16), "b_dec": (16,)},
    "jumprelu": {"W_enc": (16, 40), "b_enc": (40,), "W_dec": (40, 16), "b_dec": (16,),
                 "threshold": (40,)},
    "gated": {"W_enc": (16, 40), "b_gate": (40,), "r_mag": (40,), "b_mag": (40,),
              "W_dec": (40, 16), "b_dec": (16,)},
}


def trained_like(arch: str):
    """An SAE with non-trivial weights (and a learned batchtopk threshold)."""
    sae = build_sae(arch, 16, 40, {"k": 5} if "topk" in arch else {}, seed=1)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    sae.training_forward(SCALE * torch.randn(64, 16, generator=gen), TrainProgress(0, 10, 0))
    return sae.eval()


def save(sae, folder, **extra):
    sparsity = torch.linspace(-6, 0, sae.d_sae)
    return save_sae(sae, folder, hook="blocks.0.hook_resid_post", model="tiny", d_in=sae.d_in,
                    extra_cfg=extra, sparsity=sparsity, input_scale=SCALE)


@pytest.mark.parametrize("arch", SAE_ARCHS)
def test_layout_and_cfg(tmp_path, arch):
    sae = trained_like(arch)
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    save(sae, tmp_path, store="/abs/store.zarr")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cfg.json", "sae_weights.safetensors", "sparsity.safetensors"]
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == SAELENS_ARCH[arch]
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"], cfg["normalize_activations"]) == (
        16, 40, "float32", "none")
    assert cfg["apply_b_dec_to_input"] == (arch not in ("april", "jumprelu"))
    assert cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_post"
    assert cfg["metadata"]["model_name"] == "tiny"
    assert cfg["metadata"]["sae_lens_version"] == "6.0.0"
    ours = cfg["train_sae"]
    assert ours["arch"] == arch and ours["input_scale"] == SCALE
    assert ours["store"] == "/abs/store.zarr"
    assert ("k" in cfg) == (arch == "topk") and cfg.get("k", 5) == 5
    weights = load_file(tmp_path / "sae_weights.safetensors")
    assert {k: tuple(v.shape) for k, v in weights.items()} == WEIGHTS[SAELENS_ARCH[arch]]
    assert all(v.dtype == torch.float32 for v in weights.values())
    sparsity = load_file(tmp_path / "sparsity.safetensors")["sparsity"]
    torch.testing.assert_close(sparsity, torch.linspace(-6, 0, 40))
    for k, v in sae.state_dict().items():  # saving folds a copy, never the training SAE
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("arch", SAE_ARCHS)
def test_round_trip_is_exact_and_folded(tmp_path, arch):
    sae = trained_like(arch)
    save(sae, tmp_path)
    loaded, cfg = load_sae(tmp_path)
    assert loaded.arch == arch and not loaded.training
    x = torch.randn(100, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        acts = sae.encode(x * SCALE)
        assert (acts > 0).any()
        torch.testing.assert_close(loaded.encode(x), acts, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded(x), sae(x * SCALE) / SCALE, rtol=1e-5, atol=1e-5)
        # save -> load -> save -> load changes nothing (input_scale 1: nothing more to fold)
        again = tmp_path / "again"
        save_sae(loaded, again, hook="h", model="m", d_in=16, extra_cfg={},
                 sparsity=torch.zeros(40), input_scale=1.0)
        reloaded, _ = load_sae(again)
        assert torch.equal(reloaded.encode(x), loaded.encode(x))
        assert torch.equal(reloaded(x), loaded(x))
    assert cfg["train_sae"]["hyperparameters"] == {
        k: v for k, v in vars(sae.cfg).items()}


def test_loads_plain_saelens_standard_folder(tmp_path):
    """A folder written by SAELens itself (no train_sae section) loads as the matching arch."""
    sae = trained_like("april")
    save(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    del cfg["train_sae"]
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    loaded, _ = load_sae(tmp_path)
    assert loaded.arch == "april"
    x = torch.randn(10, 16)
    torch.testing.assert_close(loaded(x), sae(x * SCALE) / SCALE, rtol=1e-5, atol=1e-5)


def test_resave_replaces_cleanly(tmp_path):
    save(trained_like("relu"), tmp_path)
    save(trained_like("topk"), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cfg.json", "sae_weights.safetensors", "sparsity.safetensors"]
    assert load_sae(tmp_path)[0].arch == "topk"


def test_bad_inputs_are_user_errors(tmp_path):
    sae = trained_like("relu")
    with pytest.raises(UserError, match="sparsity must have shape"):
        save_sae(sae, tmp_path, hook="h", model="m", d_in=16, extra_cfg={},
                 sparsity=torch.zeros(3), input_scale=1.0)
    with pytest.raises(UserError, match="does not match"):
        save_sae(sae, tmp_path, hook="h", model="m", d_in=8, extra_cfg={},
                 sparsity=torch.zeros(40), input_scale=1.0)
    with pytest.raises(UserError, match="input_scale must be > 0"):
        save_sae(sae, tmp_path, hook="h", model="m", d_in=16, extra_cfg={},
                 sparsity=torch.zeros(40), input_scale=0.0)
    assert not (tmp_path / "cfg.json").exists()
    with pytest.raises(UserError, match="is not a saved SAE"):
        load_sae(tmp_path / "missing")
    save(sae, tmp_path / "run")
    weights = load_file(tmp_path / "run" / "sae_weights.safetensors")
    weights["W_dec"] = weights["W_dec"][:10]
    save_file(weights, tmp_path / "run" / "sae_weights.safetensors")
    with pytest.raises(UserError, match="expected"):
        load_sae(tmp_path / "run")
    (tmp_path / "run" / "cfg.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read"):
        load_sae(tmp_path / "run")
