"""Sweep specification: grid crossing rules, widths, names, TOML members, parse errors."""

import pytest

from shared.errors import UserError
from train_sae.training.sweep import GridSpec, expand_grid, fmt, load_toml, parse_list

D_IN, BATCH, STEPS = 16, 256, 1000


def grid(**kw):
    return expand_grid(GridSpec(**kw), {"h": D_IN}, BATCH, STEPS)


def test_options_cross_only_with_the_archs_they_apply_to():
    members = grid(archs=["topk", "relu"], widths=[64],
                   values={"k": [16, 32], "l1_coefficient": [1e-3, 5e-3]})
    names = sorted(m.name for m in members)
    assert len(members) == 4
    assert sum(m.arch == "topk" for m in members) == 2
    assert {m.params.k for m in members if m.arch == "topk"} == {16, 32}  # typed configs
    assert {m.params.l1_coefficient for m in members if m.arch == "relu"} == {1e-3, 5e-3}
    assert all(not hasattr(m.params, "l1_coefficient") for m in members if m.arch == "topk")
    assert len(set(names)) == 4


def test_optimizer_options_cross_with_every_arch_and_widths_multiply():
    members = grid(archs=["topk", "april"], expansions=[2, 4], values={"lr": [1e-4, 1e-3]})
    assert len(members) == 2 * 2 * 2
    assert {m.d_sae for m in members} == {32, 64}
    assert {m.optim.lr for m in members} == {1e-4, 1e-3}


def test_per_arch_defaults():
    (april,) = grid(archs=["april"], widths=[64])
    assert (april.optim.lr, april.optim.lr_decay_frac, april.optim.grad_clip) == (5e-5, 0.2, 1.0)
    (topk,) = grid(archs=["topk"], widths=[2**16])
    assert topk.optim.lr == pytest.approx(2e-4 / 2)  # 1/sqrt(width / 2^14)
    (relu,) = grid(archs=["relu"], widths=[64])
    assert relu.resample.enabled and relu.resample.steps(STEPS) == [250, 500, 750]
    assert relu.optim.lr_warmup_steps == 50 and relu.optim.lr == pytest.approx(1e-3 / 4)
    assert relu.name == "relu-w64-lr2.5e-4-rs"


def test_resample_on_off_crosses_only_relu():
    members = grid(archs=["relu", "topk"], widths=[64], values={"resample": [True, False]})
    assert sorted(m.name for m in members) == [
        "relu-w64-lr2.5e-4-nors", "relu-w64-lr2.5e-4-rs", "topk-w64-lr3.2e-3"]


@pytest.mark.parametrize("kw, message", [
    (dict(archs=["relu"], widths=[64], values={"k": [4]}), "--k applies to none"),
    (dict(archs=["topk"], widths=[64], values={"resample": [True]}), "--resample applies to none"),
    (dict(archs=["mystery"], widths=[64]), "unknown architecture 'mystery'"),
    (dict(archs=["topk"], widths=[0]), "--width must be >= 1"),
    (dict(archs=["topk"]), "give the SAE width"),
    (dict(archs=["topk"], widths=[8], expansions=[2]), "either --width or --expansion"),
    (dict(archs=["topk"], widths=[8], values={"bogus": [1]}), "no architecture has it"),
    (dict(archs=["topk", "topk"], widths=[8]), "twice"),
])
def test_bad_grids(kw, message):
    with pytest.raises(UserError, match=message):
        grid(**kw)


def test_fmt_and_parse():
    assert [fmt(2e-4), fmt(0.005), fmt(32), fmt(1.5), fmt(0.25), fmt(True)] == [
        "2e-4", "5e-3", "32", "1.5", "0.25", "on"]
    # at most 3 significant digits, no "+" or "e+03"; None: the exact float, never fewer digits
    assert [fmt(5.3333e-4), fmt(4.5255e-3), fmt(1234.5), fmt(1e5), fmt(100.0), fmt(1 / 3)] == [
        "5.33e-4", "4.53e-3", "1.23e3", "1e5", "100", "0.333"]
    assert [fmt(5.3333e-4, None), fmt(100.0, None), fmt(1 / 3, None), fmt(2e-4, None)] == [
        "5.3333e-4", "100", "0.3333333333333333", "2e-4"]
    assert parse_list("16,32", "--k") == [16, 32]
    assert parse_list("1e-3, 5e-3", "--l1") == [1e-3, 5e-3]
    assert parse_list("on,off", "--resample") == [True, False]
    with pytest.raises(UserError, match="empty item"):
        parse_list("1,,2", "--k")


def test_toml_members(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text(
        '[defaults]\nlr = 1e-3\n'
        '[[member]]\narch = "topk"\nwidth = 64\nk = 8\n'
        '[[member]]\narch = "relu"\nexpansion = 2\nl1_coefficient = 0.5\nresample = false\n'
        '[[member]]\narch = "relu"\nexpansion = 2\nl1_coefficient = 0.5\nresample_at = [0.5]\n'
    )
    members = load_toml(path, {"h": D_IN}, BATCH, STEPS)
    assert [m.name for m in members] == [
        "topk-w64-k8-lr1e-3", "relu-w32-l10.5-lr1e-3-nors", "relu-w32-l10.5-lr1e-3-rs"]
    assert members[2].resample.steps(STEPS) == [500]
    assert all(m.optim.lr == 1e-3 for m in members)


@pytest.mark.parametrize("text, message", [
    ('[[member]]\narch = "topk"\nwidth = 64\nl1_coefficient = 1.0\n', "does not apply to arch 'topk'"),
    ('[[member]]\nwidth = 64\n', "has no arch"),
    ('[[member]]\narch = "topk"\nwidth = 64\n[[member]]\narch = "topk"\nwidth = 64\n', "both be named"),
    ('[grid]\nx = 1\n', "unknown table"),
    ('[[member]\n', "not valid TOML"),
])
def test_bad_toml(tmp_path, text, message):
    path = tmp_path / "sweep.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        load_toml(path, {"h": D_IN}, BATCH, STEPS)


def test_several_hooks_give_per_hook_saes_and_one_crosscoder_over_all():
    dims = {"a": 16, "m/b": 8}
    members = expand_grid(GridSpec(archs=["topk", "crosscoder_topk", "crosscoder"],
                                   expansions=[2], values={"k": [4, 8], "l1_coefficient": [1.0],
                                                           "dec_init_norm": [0.1]}),
                          dims, BATCH, STEPS)
    by_name = {m.name: m for m in members}
    assert list(by_name) == [
        "a--topk-w32-k4-lr4.53e-3", "a--topk-w32-k8-lr4.53e-3",
        "m.b--topk-w16-k4-lr6.4e-3", "m.b--topk-w16-k8-lr6.4e-3",  # 2e-4 / sqrt(width / 2^14)
        "crosscoder_topk-w48-dinit0.1-k4-lr3.7e-3", "crosscoder_topk-w48-dinit0.1-k8-lr3.7e-3",
        "crosscoder-w48-dinit0.1-l11-lr5e-5"]
    assert by_name["m.b--topk-w16-k4-lr6.4e-3"].hooks == ("m/b",)
    cc = by_name["crosscoder-w48-dinit0.1-l11-lr5e-5"]
    assert cc.hooks == ("a", "m/b") and cc.d_sae == 2 * (16 + 8)  # expansion x summed d_in
    assert (cc.optim.lr, cc.optim.beta1, cc.optim.beta2, cc.optim.lr_decay_frac,
            cc.optim.grad_clip) == (5e-5, 0.9, 0.999, 0.2, 1.0)
    assert cc.params.to_dict() == {"l1_coefficient": 1.0, "dec_init_norm": 0.1,
                                   "l1_warmup_fraction": 0.05}
    assert type(cc).from_dict(cc.to_dict()) == cc
    with pytest.raises(UserError, match="crosscoder reads several hooks at once but only a is"):
        expand_grid(GridSpec(archs=["crosscoder"], widths=[8]), {"a": 16}, BATCH, STEPS)


def test_toml_over_several_hooks(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text('[[member]]\narch = "topk"\nwidth = 64\nk = 8\n'
                    '[[member]]\narch = "crosscoder"\nexpansion = 1\nl1_coefficient = 2.0\n')
    members = load_toml(path, {"x": 16, "y": 16}, BATCH, STEPS)
    assert [(m.name, m.hooks) for m in members] == [
        ("x--topk-w64-k8-lr3.2e-3", ("x",)), ("y--topk-w64-k8-lr3.2e-3", ("y",)),
        ("crosscoder-w32-l12-lr5e-5", ("x", "y"))]


def test_names_round_to_3_digits_unless_two_members_would_collide():
    (topk,) = grid(archs=["topk"], widths=[2304])  # default lr 2e-4 / sqrt(2304 / 2^14)
    assert topk.optim.lr == pytest.approx(5.3333e-4, rel=1e-4) and topk.name == "topk-w2304-lr5.33e-4"
    members = grid(archs=["topk"], widths=[64], values={"lr": [1.2341e-3, 1.2344e-3, 5e-3],
                                                        "k": [4, 8]})
    # the two lrs that agree to 3 digits are named in full; 5e-3 keeps its short name
    assert [m.name for m in members] == [
        "topk-w64-k4-lr1.2341e-3", "topk-w64-k8-lr1.2341e-3", "topk-w64-k4-lr1.2344e-3",
        "topk-w64-k8-lr1.2344e-3", "topk-w64-k4-lr5e-3", "topk-w64-k8-lr5e-3"]
    with pytest.raises(UserError, match="both be named 'topk-w64-k4-lr5e-3'"):
        grid(archs=["topk"], widths=[64], values={"lr": [5e-3, 0.005], "k": [4]})
