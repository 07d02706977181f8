"""Crosscoder save -> load: identical outputs, per-hook scales folded, both weight layouts."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from synthetic import build_crosscoder

from shared.errors import UserError
from train_sae.training.crosscoder_saving import (
    CFG_FILE,
    WEIGHTS_FILE,
    load_crosscoder,
    save_crosscoder,
)
from train_sae.training.saving import SPARSITY_FILENAME as SPARSITY_FILE


def _trained_like(arch: str, splits: list[int], params: dict, d_sae: int = 10):
    cc = build_crosscoder(arch, splits, [f"blocks.{i}.hook_resid_post" for i in range(len(splits))],
                          d_sae, params, seed=1)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in cc.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return cc


def _per_column(scales: list[float], splits: list[int]) -> torch.Tensor:
    return torch.repeat_interleave(torch.tensor(scales), torch.tensor(splits))


@pytest.mark.parametrize("arch, params", [
    ("crosscoder", {"l1_coefficient": 0.7, "l1_warmup_fraction": 0.0}),
    ("crosscoder_topk", {"k": 3}),
])
def test_round_trip_stacked_layout(tmp_path, arch, params):
    splits, scales = [6, 6], [1.5, 0.2]
    cc = _trained_like(arch, splits, params)
    sparsity = torch.linspace(-5, 0, 10)
    before = [p.detach().clone() for p in cc.parameters()]
    folder = save_crosscoder(cc, tmp_path / "xc", models=["gpt2", "gpt2-chat"],
                             sparsity=sparsity, input_scales=scales, extra_cfg={"tokens": 123})
    assert all(torch.equal(a, b) for a, b in zip(before, cc.parameters(), strict=True))  # untouched

    loaded, cfg = load_crosscoder(folder)
    assert type(loaded) is type(cc) and loaded.hooks == cc.hooks and loaded.splits == splits
    x = torch.randn(20, 12)
    col = _per_column(scales, splits)
    # the saved crosscoder acts on raw activations: loaded(x) == cc(x * s) / s per hook
    torch.testing.assert_close(loaded.encode(x), cc.encode(x * col))
    torch.testing.assert_close(loaded(x), cc(x * col) / col)

    assert cfg["arch"] == arch and cfg["params"] == cc.cfg.to_dict() and cfg["d_sae"] == 10
    assert cfg["d_in_per_hook"] == {"blocks.0.hook_resid_post": 6, "blocks.1.hook_resid_post": 6}
    assert cfg["input_scales_folded"] == scales and cfg["models"] == ["gpt2", "gpt2-chat"]
    assert cfg["weight_layout"] == "stacked" and cfg["tokens"] == 123
    weights = load_file(str(folder / WEIGHTS_FILE))
    assert {k: tuple(v.shape) for k, v in weights.items()} == {
        "W_enc": (2, 6, 10), "W_dec": (10, 2, 6), "b_enc": (10,), "b_dec": (2, 6)}
    torch.testing.assert_close(weights["W_dec"][:, 1], cc.W_dec.detach()[:, 6:] / 0.2)
    torch.testing.assert_close(load_file(str(folder / SPARSITY_FILE))["sparsity"], sparsity)


def test_round_trip_per_hook_layout_and_overwrite(tmp_path):
    splits, scales = [3, 8, 5], [2.0, 0.5, 4.0]
    cc = _trained_like("crosscoder", splits, {})
    folder = tmp_path / "xc"
    save_crosscoder(cc, folder, models="pythia-70m", sparsity=torch.zeros(10), input_scales=1.0)
    save_crosscoder(cc, folder, models="pythia-70m", sparsity=torch.zeros(10), input_scales=scales)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["xc"]  # replaced, no temporaries left
    assert sorted(p.name for p in folder.iterdir()) == [CFG_FILE, WEIGHTS_FILE, SPARSITY_FILE]
    loaded, cfg = load_crosscoder(folder)
    assert cfg["weight_layout"] == "per_hook" and cfg["models"] == ["pythia-70m"] * 3
    weights = load_file(str(folder / WEIGHTS_FILE))
    assert tuple(weights["W_enc.1"].shape) == (8, 10) and tuple(weights["W_dec.2"].shape) == (10, 5)
    assert tuple(weights["b_dec.0"].shape) == (3,)
    x = torch.randn(7, 16)
    col = _per_column(scales, splits)
    torch.testing.assert_close(loaded(x), cc(x * col) / col)


def test_bad_save_arguments(tmp_path):
    cc = _trained_like("crosscoder", [4, 4], {})
    with pytest.raises(UserError, match="one per hook"):
        save_crosscoder(cc, tmp_path / "a", models=["m1", "m2", "m3"], sparsity=torch.zeros(10),
                        input_scales=1.0)
    with pytest.raises(UserError, match="one scale per hook"):
        save_crosscoder(cc, tmp_path / "b", models="m", sparsity=torch.zeros(10),
                        input_scales=[1.0])
    assert list(tmp_path.iterdir()) == []


def test_load_errors_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="not a saved crosscoder"):
        load_crosscoder(tmp_path / "nowhere")
    cc = _trained_like("crosscoder", [4, 4], {})
    folder = save_crosscoder(cc, tmp_path / "xc", models="m", sparsity=torch.zeros(10),
                             input_scales=1.0)
    (folder / WEIGHTS_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="damaged"):
        load_crosscoder(folder)
    cfg = json.loads((folder / CFG_FILE).read_text())
    (folder / CFG_FILE).write_text(json.dumps({**cfg, "format_version": 99}))
    with pytest.raises(UserError, match="format version 99"):
        load_crosscoder(folder)
    (folder / CFG_FILE).write_text(json.dumps({**cfg, "arch": "standard"}))
    with pytest.raises(UserError, match="does not describe a crosscoder"):
        load_crosscoder(folder)
    (folder / CFG_FILE).write_text(json.dumps({k: v for k, v in cfg.items() if k != "splits"}))
    with pytest.raises(UserError, match="lacks splits"):
        load_crosscoder(folder)
    (folder / CFG_FILE).write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        load_crosscoder(folder)
