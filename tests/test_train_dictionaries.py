"""Transcoders, skip transcoders, CLTs and Matryoshka SAEs through the one dictionary system:
the grid and TOML spellings, scaling folds, saved formats and their loaders, a one-pass CLI sweep
over input/output hook pairs, and bad input (one line, exit 2)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import invoke
from safetensors.torch import load_file
from synthetic import make_sparse_data, write_multihook_store

from shared.errors import UserError
from train_sae.cli import main
from train_sae.dictionaries import IO, TrainProgress, build
from train_sae.training.clt_saving import load_clt, save_clt
from train_sae.training.loading import load_dictionary
from train_sae.training.saving import load_sae, save_sae
from train_sae.training.sweep import GridSpec, expand_grid, load_toml

PAIRS_IN, PAIRS_OUT = {"in0": 16, "in1": 16}, {"out0": 12, "out1": 12}


def grid(archs, inputs=PAIRS_IN, outputs=PAIRS_OUT, **values):
    return expand_grid(GridSpec(archs=archs, widths=[32], values=values), inputs, 256, 1000,
                       outputs)


# --- the grid ---------------------------------------------------------------------------------
def test_sparsity_follows_the_options_given():
    names = [m.name for m in grid(["transcoder"], k=[4], l1_coefficient=[0.5])]
    assert names == ["in0--transcoder.topk-w32-k4-lr4.53e-3", "in0--transcoder.relu-w32-l10.5-lr2.5e-4",
                     "in1--transcoder.topk-w32-k4-lr4.53e-3", "in1--transcoder.relu-w32-l10.5-lr2.5e-4"]
    (only,) = grid(["transcoder"], {"in0": 16}, {"out0": 12})  # no option: the default, TopK
    assert only.sparsity == "topk" and only.params.k == 32 and only.out_hooks == ("out0",)
    named = grid(["clt"], sparsity=["jumprelu", "batchtopk"], l0_coefficient=[2.0])
    assert [(m.name, m.hooks, m.out_hooks) for m in named] == [
        ("clt.jumprelu-w32-l0c2-lr7e-5", ("in0", "in1"), ("out0", "out1")),
        ("clt.batchtopk-w32-lr4.53e-3", ("in0", "in1"), ("out0", "out1"))]
    assert named[0].params.l0_coefficient == 2.0


def test_sae_archs_read_each_hook_and_ignore_the_outputs_as_inputs():
    members = grid(["topk", "skip_transcoder"], k=[4])
    assert [(m.name, m.hooks, m.out_hooks) for m in members] == [
        ("in0--topk-w32-k4-lr4.53e-3", ("in0",), ()), ("in1--topk-w32-k4-lr4.53e-3", ("in1",), ()),
        ("in0--skip_transcoder.topk-w32-k4-lr4.53e-3", ("in0",), ("out0",)),
        ("in1--skip_transcoder.topk-w32-k4-lr4.53e-3", ("in1",), ("out1",))]


def test_matryoshka_widths_on_the_command_line_and_in_toml(tmp_path):
    members = grid(["matryoshka_batchtopk"], {"x": 16}, {},
                   matryoshka_widths=[(8, 32), (16, 32)], k=[4])
    assert [m.params.matryoshka_widths for m in members] == [(8, 32), (16, 32)]
    assert [m.name for m in members] == ["matryoshka_batchtopk-w32-k4-mw8+32-lr4.53e-3",
                                         "matryoshka_batchtopk-w32-k4-mw16+32-lr4.53e-3"]
    path = tmp_path / "sweep.toml"
    path.write_text('[[member]]\narch = "matryoshka_batchtopk"\nwidth = 32\nk = 4\n'
                    'matryoshka_widths = [8, 16, 32]\n')
    (m,) = load_toml(path, {"x": 16}, 256, 1000)
    assert m.params.matryoshka_widths == (8, 16, 32)
    path.write_text('[[member]]\narch = "matryoshka_batchtopk"\nwidth = 32\n'
                    'matryoshka_widths = 32\n')
    with pytest.raises(UserError, match="'matryoshka_widths' takes an array"):
        load_toml(path, {"x": 16}, 256, 1000)


@pytest.mark.parametrize("archs, inputs, outputs, values, message", [
    (["topk"], PAIRS_IN, PAIRS_OUT, {}, "--out-hook is for architectures that predict"),
    (["transcoder"], PAIRS_IN, {}, {}, "predicts other hooks than it reads: give --out-hook"),
    (["clt"], PAIRS_IN, {"out0": 12}, {}, "2 --hook and 1 --out-hook"),
    (["transcoder"], PAIRS_IN, PAIRS_OUT, {"sparsity": ["relu"], "k": [4]},
     "--k applies to none of the chosen architectures with the chosen sparsities"),
    (["transcoder"], PAIRS_IN, PAIRS_OUT, {"sparsity": ["gated"]}, "has no sparsity 'gated'"),
    (["transcoder"], PAIRS_IN, PAIRS_OUT, {"k": [4], "aux_coefficient": [0.1],
                                          "l0_coefficient": [1.0], "bandwidth": [0.1]}, None),
])
def test_bad_hook_and_option_combinations(archs, inputs, outputs, values, message):
    if message is None:  # every option is used by some sparsity: fine
        assert len(grid(archs, inputs, outputs, **values)) == 4
        return
    with pytest.raises(UserError, match=message):
        grid(archs, inputs, outputs, **values)


def test_clt_layers_must_be_alike_and_divide_the_width():
    with pytest.raises(UserError, match="input hooks have different widths"):
        build("clt", IO.of({"a": 8, "b": 4}, {"c": 6, "d": 6}), 32, {}, 0)
    with pytest.raises(UserError, match="33 does not divide by 2"):
        build("clt", IO.of({"a": 8, "b": 8}, {"c": 6, "d": 6}), 33, {}, 0)
    with pytest.raises(UserError, match="k=20 is larger than the width 16"):  # k per layer
        build("clt", IO.of({"a": 8, "b": 8}, {"c": 6, "d": 6}), 32, {"k": 20}, 0)


# --- the models -------------------------------------------------------------------------------
def perturbed(arch: str, io: IO, params: dict, seed: int = 0):
    model = build(arch, io, 32, params, seed)
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.mark.parametrize("arch, io", [
    ("transcoder", IO.of({"a": 8}, {"b": 6})), ("skip_transcoder", IO.of({"a": 8}, {"b": 6})),
    ("clt", IO.of({"a": 8, "b": 8}, {"c": 6, "d": 6})),
])
@pytest.mark.parametrize("sparsity", ["topk", "relu", "jumprelu"])
def test_folding_input_and_output_scales(arch, io, sparsity):
    params = {"sparsity": sparsity, **({"k": 3} if sparsity == "topk" else {})}
    model = perturbed(arch, io, params)
    folded = perturbed(arch, io, params)
    s_in = [2.0, 0.5][:len(io.inputs)]
    t_out = [0.25, 3.0][:len(io.outputs)]
    folded.fold_scaling(s_in, t_out)
    x = torch.randn(20, model.d_in)
    col_in = torch.repeat_interleave(torch.tensor(s_in), torch.tensor(io.in_splits))
    col_out = torch.repeat_interleave(torch.tensor(t_out), torch.tensor(io.out_splits))
    with torch.no_grad():  # folded(x) == model(x * s) / t: the latents are unchanged
        torch.testing.assert_close(folded.encode(x), model.encode(x * col_in))
        torch.testing.assert_close(folded(x), model(x * col_in) / col_out)


def test_clt_latents_write_only_their_own_and_later_layers():
    clt = perturbed("clt", IO.of({"a": 8, "b": 8}, {"c": 6, "d": 6}), {"k": 3})
    x = torch.randn(10, 16)
    late = x.clone()
    late[:, 8:] = torch.randn(10, 8)  # another input for layer 1
    with torch.no_grad():
        y, y_late = clt(x), clt(late)
    torch.testing.assert_close(y[:, :6], y_late[:, :6])  # layer 0's output ignores input 1
    assert not torch.allclose(y[:, 6:], y_late[:, 6:])
    norms = clt.decoder_norms()  # [32, 2]: layer-1 latents have nothing at output 0
    assert norms[16:, 0].abs().max() < 1e-6 and norms[:16].min() > 0


def test_clt_l1_weighs_latents_by_their_summed_decoder_norms():
    clt = perturbed("clt", IO.of({"a": 4, "b": 4}, {"c": 3, "d": 3}), {"sparsity": "relu",
                                                                        "l1_coefficient": 0.5})
    x, y = torch.randn(16, 8), torch.randn(16, 6)
    out = clt.training_forward(x, TrainProgress(100, 100, 0), y)
    acts = clt.encode(x)
    weights = (clt.W_dec * clt.causal_mask).pow(2).sum(-1).sqrt().sum(-1).reshape(-1)
    expect = (acts * weights).sum(-1).mean()
    torch.testing.assert_close(out.parts["l1"], expect)
    torch.testing.assert_close(out.loss, out.parts["mse"] + 0.5 * expect)


@pytest.mark.parametrize("sparsity", ["topk", "batchtopk", "relu", "jumprelu"])
def test_clt_saves_and_loads_exactly(tmp_path, sparsity):
    io = IO.of({"blocks.0.hook_resid_mid": 8, "blocks.1.hook_resid_mid": 8},
               {"blocks.0.hook_mlp_out": 6, "blocks.1.hook_mlp_out": 6})
    params = {"sparsity": sparsity, **({"k": 3} if "topk" in sparsity else {})}
    clt = perturbed("clt", io, params)
    if sparsity == "batchtopk":
        clt.train()
        clt.training_forward(torch.randn(32, 16), None, torch.randn(32, 12))
        clt.eval()
    save_clt(clt, tmp_path / "clt", models=["m", "m"], sparsity=torch.zeros(32),
             input_scales=[2.0, 1.0], output_scales=[0.5, 4.0])
    loaded, cfg = load_dictionary(tmp_path / "clt")
    assert (cfg["format"], cfg["sparsity"], cfg["n_layers"]) == ("clt", sparsity, 2)
    assert loaded.in_hooks == io.in_hooks and loaded.out_hooks == io.out_hooks
    x = torch.randn(20, 16)
    s, t = torch.tensor([2.0] * 8 + [1.0] * 8), torch.tensor([0.5] * 6 + [4.0] * 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), clt(x * s) / t)
    tensors = {k: tuple(v.shape)
               for k, v in load_file(tmp_path / "clt" / "clt_weights.safetensors").items()}
    assert tensors["W_enc"] == (2, 8, 16) and tensors["W_dec.0"] == (16, 2, 6)
    assert tensors["W_dec.1"] == (16, 1, 6) and tensors["b_dec"] == (2, 6)
    assert ("threshold" in tensors) == (sparsity in ("jumprelu", "batchtopk"))
    (tmp_path / "clt" / "clt_weights.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="clt_weights.safetensors"):
        load_clt(tmp_path / "clt")


@pytest.mark.parametrize("arch", ["transcoder", "skip_transcoder"])
def test_topk_transcoders_save_in_our_format_and_load_back(tmp_path, arch):
    tc = perturbed(arch, IO.of({"blocks.0.ln2.hook_normalized": 8},
                               {"blocks.0.hook_mlp_out": 6}), {"k": 3})
    save_sae(tc, tmp_path, hook="blocks.0.ln2.hook_normalized", model="m", d_in=8,
             extra_cfg={}, sparsity=torch.zeros(32), input_scale=2.0,
             out_hook="blocks.0.hook_mlp_out", output_scale=0.5)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["k"], cfg["d_out"]) == ("topk_transcoder", 3, 6)
    assert cfg["metadata"]["hook_name_out"] == "blocks.0.hook_mlp_out"
    loaded, _ = load_sae(tmp_path)
    assert (loaded.arch, loaded.sparsity, loaded.out_hooks) == (arch, "topk",
                                                                 ["blocks.0.hook_mlp_out"])
    x = torch.randn(20, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), tc(x * 2.0) / 0.5)


# --- the CLI ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair_store(tmp_path_factory):
    """Two input/output pairs: out_h = relu(in_0 ... in_h mixed), so a CLT has work to do."""
    x0, _ = make_sparse_data(4096, 16, 32, 2, seed=0)
    x1, _ = make_sparse_data(4096, 16, 32, 2, seed=1)
    mix = torch.randn(16, 12, generator=torch.Generator().manual_seed(2)) / 4
    path = tmp_path_factory.mktemp("pairs") / "store"
    write_multihook_store(path, {"in0": x0, "in1": x1, "out0": torch.relu(x0 @ mix),
                                 "out1": torch.relu((x0 + x1) @ mix), "narrow": x0[:, :4]},
                          chunk_rows=512)
    return path


def cli(monkeypatch, capsys, *args):
    return invoke(main, "train-sae", monkeypatch, capsys, *args)


def test_one_pass_sweep_of_transcoders_and_a_clt(tmp_path, monkeypatch, capsys, pair_store):
    out = tmp_path / "sweep"
    code, stdout, err = cli(monkeypatch, capsys, "sweep", "--store", pair_store, "--out", out,
                            "--hook", "in0", "--hook", "in1", "--out-hook", "out0",
                            "--out-hook", "out1", "--arch", "transcoder,skip_transcoder,clt",
                            "--k", "4", "--width", "64", "--batch-size", "256", "--lr", "3e-3",
                            "--tokens", "200k", "--device", "cpu", "--log-every", "100")
    assert code == 0, err
    doc = json.loads((out / "sweep.json").read_text())
    assert [m["out_hooks"] for m in doc["members"]] == [["out0"], ["out0"], ["out1"], ["out1"],
                                                          ["out0", "out1"]]
    final = {}
    for m in doc["members"]:
        folder = out / m["name"]
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["status"] == "done", m["name"]
        assert metrics["final"]["l0"] <= 4 * len(m["hooks"]) + 1e-6
        final[m["name"]] = metrics["final"]
        model, _ = load_dictionary(folder)
        assert model.out_hooks == m["out_hooks"]
    # out0 depends on in0 alone: the transcoders of that pair predict it well
    assert final["in0--transcoder.topk-w64-k4-lr3e-3"]["fvu"] < 0.15
    assert final["in0--skip_transcoder.topk-w64-k4-lr3e-3"]["fvu"] < 0.15
    # out1 depends on in0 too, which only the CLT reads (its layer-0 latents write to out1)
    clt = final["clt.topk-w64-k4-lr3e-3"]
    assert clt["fvu/out1"] < 0.8 * final["in1--transcoder.topk-w64-k4-lr3e-3"]["fvu"]
    assert clt["fvu/out0"] < 0.3
    assert "clt.topk-w64-k4-lr3e-3" in stdout


@pytest.mark.parametrize("extra, message", [
    (["--hook", "in0", "--out-hook", "out0", "--arch", "topk"], "--out-hook is for"),
    (["--hook", "in0", "--hook", "in1", "--out-hook", "out0", "--arch", "clt"],
     "2 --hook and 1 --out-hook"),
    (["--hook", "in0", "--hook", "in1", "--out-hook", "out0", "--out-hook", "narrow",
      "--arch", "clt"], "output hooks have different widths"),
    (["--hook", "in0", "--out-hook", "nowhere", "--arch", "transcoder"], "nowhere"),
    (["--hook", "in0", "--out-hook", "out0", "--out-hook", "out0", "--arch", "transcoder"],
     "--out-hook out0 is given twice"),
    (["--hook", "in0", "--arch", "matryoshka_batchtopk", "--matryoshka-widths", "16+8+64"],
     "must increase strictly"),
    (["--hook", "in0", "--arch", "matryoshka_batchtopk", "--matryoshka-widths", "16+32"],
     "must end at the width 64"),
    (["--hook", "in0", "--arch", "matryoshka_batchtopk", "--matryoshka-widths", "16++64"],
     "empty item"),
    (["--hook", "in0", "--arch", "transcoder", "--out-hook", "out0", "--sparsity", "fancy"],
     "--sparsity must be one of topk, batchtopk, relu, jumprelu"),
])
def test_bad_dictionary_options_exit_2_with_one_line(tmp_path, monkeypatch, capsys, pair_store,
                                                     extra, message):
    out = tmp_path / "sweep"
    code, _, err = cli(monkeypatch, capsys, "sweep", "--store", pair_store, "--out", out,
                       "--width", "64", "--batch-size", "256", "--device", "cpu", *extra)
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


# --- adding an architecture -------------------------------------------------------------------
def test_a_new_architecture_is_one_class_and_its_registry_line(tmp_path, monkeypatch, capsys):
    """An architecture defined here, registered, and nothing else: the sweep trains it (with
    its own option through --param), saves it and loads it back."""
    from dataclasses import dataclass

    from synthetic import write_synthetic_store

    from train_sae.dictionaries import REGISTRY, register
    from train_sae.dictionaries.common import LinearSAE, UnitNormDecoder
    from train_sae.dictionaries.sparsity import TopK, TopKConfig

    @dataclass
    class AbsTopKConfig(TopKConfig):
        k: int = 3

    class AbsTopKSAE(TopK, UnitNormDecoder, LinearSAE):
        """TopK on |pre|, keeping the sign (as SAELens's abstopk)."""

        arch = "abstopk_test"
        saelens_architecture = "topk"
        Config = AbsTopKConfig

        def select(self, pre_relu):  # here `pre` itself (activation below passes it unchanged)
            top = pre_relu.abs().topk(self.cfg.k, dim=-1).indices
            return torch.zeros_like(pre_relu).scatter(-1, top, pre_relu.gather(-1, top))

        def activation(self, pre):
            return self.select(pre)

        def train_activation(self, pre):
            return self.select(pre)

    monkeypatch.setitem(REGISTRY, "abstopk_test", {})
    register(AbsTopKSAE)
    x, _ = make_sparse_data(2048, 8, 16, 2, seed=0)
    write_synthetic_store(tmp_path / "store", x, chunk_rows=512)
    code, _, err = cli(monkeypatch, capsys, "sweep", "--store", tmp_path / "store", "--out",
                       tmp_path / "o", "--arch", "abstopk_test,topk", "--width", "16",
                       "--param", "k=2", "--batch-size", "128", "--device", "cpu")
    assert code == 0, err
    folder = tmp_path / "o" / "abstopk_test-w16-k2-lr6.4e-3"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["status"] == "done" and metrics["final"]["l0"] == pytest.approx(2.0)
    model, _ = load_dictionary(folder)
    assert type(model) is AbsTopKSAE and model.cfg.k == 2
