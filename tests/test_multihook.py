"""Several hooks in one pass: per-hook SAEs equal to single-hook runs, crosscoders through
`train-sae sweep` end to end (planted A-only / B-only / shared features), failure isolation,
and bad hook choices as one line with exit code 2."""

import json

import pytest
import torch
from conftest import invoke
from safetensors.torch import load_file
from synthetic import (
    make_paired_data,
    make_sparse_data,
    write_multihook_store,
    write_synthetic_store,
)

from shared.store import Manifest
from train_sae.cli import main
from train_sae.evaluation.crosscoder_metrics import relative_decoder_norms
from train_sae.training import trainer
from train_sae.training.config import TrainConfig
from train_sae.training.crosscoder_saving import load_crosscoder
from train_sae.training.outputs import model_and_hook
from train_sae.training.sweep import make_member

HOOKS = ["blocks.0.hook_resid_post", "chat/blocks.1.hook_mlp_out"]  # d_in 16 and 12
PREFIX = {HOOKS[0]: "blocks.0.hook_resid_post--", HOOKS[1]: "chat.blocks.1.hook_mlp_out--"}
PAIRED = ["base/blocks.0.hook_resid_post", "chat/blocks.0.hook_resid_post"]
D_HOOK, N_EACH = 32, 6


@pytest.fixture(scope="module")
def two_hooks(tmp_path_factory):
    # few directions for 32 latents, so the relu members have dead latents to resample
    x0, _ = make_sparse_data(4096, 16, 4, 1, seed=1)
    x1, _ = make_sparse_data(4096, 12, 4, 1, seed=2)
    path = tmp_path_factory.mktemp("two") / "store"
    write_multihook_store(path, {HOOKS[0]: x0, HOOKS[1]: x1}, chunk_rows=512)
    return path


@pytest.fixture(scope="module")
def paired(tmp_path_factory):
    x_a, x_b, features = make_paired_data(8192, D_HOOK, N_EACH, 0.08, seed=0)
    path = tmp_path_factory.mktemp("paired") / "store"
    write_multihook_store(path, {PAIRED[0]: x_a, PAIRED[1]: x_b}, chunk_rows=1024)
    return path, features


def cli(monkeypatch, capsys, *args):
    return invoke(main, "train-sae", monkeypatch, capsys, *args)


def folders(path):
    return sorted(p.name for p in path.iterdir() if p.is_dir())


def test_per_hook_sweep_equals_each_hook_alone(two_hooks, tmp_path, monkeypatch, capsys):
    loaders = []

    class CountingLoader(trainer.ActivationLoader):
        def __init__(self, store, hooks, *a, **kw):
            loaders.append(list(hooks))
            super().__init__(store, hooks, *a, **kw)

    monkeypatch.setattr(trainer, "ActivationLoader", CountingLoader)
    common = ["--arch", "topk,relu", "--width", 32, "--k", 4, "--l1", 1.0, "--lr", 1e-2,
              "--batch-size", 128, "--tokens", 128 * 200, "--resample-at", "0.5",
              "--log-every", 20, "--device", "cpu", "--store", two_hooks]
    code, stdout, err = cli(monkeypatch, capsys, "sweep", "--out", tmp_path / "all", "--hook",
                            "all", *common)
    assert code == 0, err
    assert loaders == [HOOKS], "one loader reads both hooks"
    singles = ["relu-w32-l11-lr0.01-rs", "topk-w32-k4-lr0.01"]
    assert folders(tmp_path / "all") == sorted(PREFIX[h] + n for h in HOOKS for n in singles)
    for i, hook in enumerate(HOOKS):
        code, _, err = cli(monkeypatch, capsys, "sweep", "--out", tmp_path / str(i), "--hook",
                           hook, *common)
        assert code == 0, err
        assert folders(tmp_path / str(i)) == singles
        for name in singles:
            alone, together = tmp_path / str(i) / name, tmp_path / "all" / (PREFIX[hook] + name)
            a, b = (load_file(str(f / "sae_weights.safetensors")) for f in (alone, together))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
            for f in ("sae_weights.safetensors", "sparsity.safetensors", "metrics.jsonl"):
                assert (alone / f).read_bytes() == (together / f).read_bytes(), (name, f)
            ma, mb = (json.loads((f / "metrics.json").read_text()) for f in (alone, together))
            assert ma["final"] == mb["final"] and mb["hook"] == hook and mb["status"] == "done"
            if name.startswith("relu"):
                assert mb["resampled"] > 0, "the per-hook resampling pool was used"
            cfg = json.loads((together / "cfg.json").read_text())
            assert cfg["metadata"]["hook_name"] == hook and cfg["d_in"] == (16, 12)[i]
    assert loaders[1:] == [[HOOKS[0]], [HOOKS[1]]]
    sweep = json.loads((tmp_path / "all" / "sweep.json").read_text())
    assert sweep["hooks"] == HOOKS and sweep["d_in"] == {HOOKS[0]: 16, HOOKS[1]: 12}


def _matched(W_dec: torch.Tensor, features: torch.Tensor, rel: torch.Tensor):
    """Per planted feature: best cosine with a decoder row, and that latent's relative norm."""
    dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    feat = features / features.norm(dim=1, keepdim=True)
    best = (feat @ dec.T).max(dim=1)
    return best.values, rel[best.indices]


def test_mixed_sweep_crosscoders_recover_where_features_live(paired, tmp_path, monkeypatch,
                                                             capsys):
    store, features = paired
    out = tmp_path / "sw"
    code, stdout, err = cli(monkeypatch, capsys, "sweep", "--store", store, "--out", out,
                            "--hook", "all", "--arch", "topk,crosscoder,crosscoder_topk",
                            "--width", 64, "--k", 4, "--l1", 0.1, "--lr", 3e-3,
                            "--batch-size", 256, "--tokens", 256 * 1500, "--log-every", 250,
                            "--device", "cpu")
    assert code == 0, err
    ccs = ["crosscoder-w64-l10.1-lr3e-3", "crosscoder_topk-w64-k4-lr3e-3"]
    saes = [h.replace("/", ".") + "--topk-w64-k4-lr3e-3" for h in PAIRED]
    assert folders(out) == sorted(saes + ccs)
    for name in saes:
        doc = json.loads((out / name / "metrics.json").read_text())
        assert doc["status"] == "done" and doc["final"]["fvu"] < 0.05, name
    for name in ccs:
        folder = out / name
        cc, cfg = load_crosscoder(folder)
        assert cc.hooks == PAIRED and cfg["models"] == ["synthetic", "synthetic"]
        scales = cfg["input_scales_folded"]
        rel = relative_decoder_norms(cc.W_dec, cc.splits, input_scales=scales)
        saved = load_file(str(folder / "relative_norms.safetensors"))["relative_norms"]
        torch.testing.assert_close(saved, rel, atol=1e-5, rtol=1e-5, equal_nan=True)
        col = torch.repeat_interleave(torch.tensor(scales), torch.tensor(cc.splits))
        cos, matched = _matched(cc.W_dec.detach() * col, features, saved)  # training units
        assert (cos > 0.9).all(), (name, cos)
        a_only, b_only, shared = matched[:N_EACH], matched[N_EACH:2 * N_EACH], matched[2 * N_EACH:]
        assert (a_only < 0.15).all() and (b_only > 0.85).all(), (name, a_only, b_only)
        assert ((shared > 0.3) & (shared < 0.7)).all(), (name, shared)

        doc = json.loads((folder / "metrics.json").read_text())
        assert doc["hooks"] == PAIRED and doc["d_in"] == 2 * D_HOOK
        final = doc["final"]
        assert final["fvu/" + PAIRED[0]] < 0.05 and final["fvu/" + PAIRED[1]] < 0.05, final
        assert final["mse/" + PAIRED[0]] > 0 and final["l0"] < 8, final
        summary = doc["relative_norms"]
        assert summary["hooks"] == PAIRED and summary["labels"] == ["base", "chat"]
        assert summary["only_a"] == int((saved < 0.1).sum()) >= N_EACH
        assert summary["only_b"] == int((saved > 0.9).sum()) >= N_EACH
        assert summary["shared"] == int(((saved >= 0.3) & (saved <= 0.7)).sum()) >= N_EACH
        assert (folder / "relative_norms.png").read_bytes()[:4] == b"\x89PNG"
        lines = [json.loads(s) for s in (folder / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in lines] == [250, 500, 750, 1000, 1250, 1500]
        assert lines[-1]["fvu/" + PAIRED[1]] < lines[0]["fvu/" + PAIRED[1]]
    assert "fvu/base/blocks.0.hook_resid_post" in stdout
    assert "train:" in err  # the progress bar


def test_failing_crosscoder_is_isolated(paired, tmp_path):
    store, _ = paired

    def run(out, given):
        cfg = TrainConfig(store=str(store), out=str(out), hooks=("all",), batch_size=256,
                          tokens=256 * 40, log_every=10, device="cpu", progress=False)
        plan = trainer.prepare(cfg)
        members = [make_member(a, 32, p, 256, plan.total_steps, hooks=h, prefix=True)
                   for a, p, h in given]
        return trainer.train(cfg, plan, members)

    good = ("topk", {"k": 4, "lr": 3e-3}, (PAIRED[1],))
    bad = ("crosscoder", {"l1_coefficient": 0.1, "lr": 1e7, "grad_clip": 0.0}, tuple(PAIRED))
    with_bad = run(tmp_path / "a", [bad, good])
    without = run(tmp_path / "b", [good])
    assert [r.status for r in with_bad] == ["failed", "done"]
    failed = with_bad[0]
    doc = json.loads((failed.folder / "metrics.json").read_text())
    assert doc["status"] == "failed" and "--lr" in doc["failure"] and doc["final"] is None
    assert not (failed.folder / "cfg.json").exists()
    for f in ("sae_weights.safetensors", "sparsity.safetensors", "metrics.jsonl"):
        assert (with_bad[1].folder / f).read_bytes() == (without[0].folder / f).read_bytes(), f


def test_diverge_factor_normalize_and_progress_switches(paired, tmp_path, capsys):
    store, _ = paired
    # at lr 0.3 this crosscoder's second loss is ~80x its first, then it recovers: stopped by
    # diverge_factor=10, not by the default 1e3
    results = {}
    for factor in (10.0, 1e3):
        cfg = TrainConfig(store=str(store), out=str(tmp_path / str(factor)), hooks=("all",),
                          batch_size=256, tokens=256 * 20, device="cpu", progress=False,
                          diverge_factor=factor, normalize=False)
        plan = trainer.prepare(cfg)
        (results[factor],) = trainer.train(cfg, plan, [
            make_member("crosscoder_topk", 32, {"k": 4, "lr": 0.3}, 256, plan.total_steps)])
    assert results[10.0].status == "failed" and "diverged at step 1" in results[10.0].failure
    assert results[1e3].status == "done", results[1e3].failure
    doc = json.loads((results[1e3].folder / "metrics.json").read_text())
    assert doc["input_scales"] == {PAIRED[0]: 1.0, PAIRED[1]: 1.0}  # normalize=False
    assert "train:" not in capsys.readouterr().err  # progress=False: no bar


def test_store_hook_of_a_tagged_model_maps_to_its_model():
    m = Manifest(model="base=gpt2,chat=./chat", hooks=PAIRED, d_in={}, dtype="float32",
                 n_rows=1, context_size=1, seed=0, chunk_rows=1,
                 model_info={"models": {"base": "gpt2", "chat": "./chat"}})
    assert model_and_hook(m, PAIRED[1]) == ("./chat", "blocks.0.hook_resid_post")
    assert model_and_hook(m, "blocks.3.hook_mlp_out") == (m.model, "blocks.3.hook_mlp_out")
    m.model_info = {}
    assert model_and_hook(m, PAIRED[0]) == (m.model, PAIRED[0])


@pytest.mark.parametrize("extra, message", [
    (["--hook", HOOKS[0], "--arch", "crosscoder"],
     f"--arch crosscoder reads several hooks at once but only {HOOKS[0]} is chosen"),
    (["--hook", "nope", "--arch", "topk"],
     f"hook 'nope' is not in store {{store}}; it holds: {', '.join(HOOKS)}"),
    (["--hook", "all", "--hook", HOOKS[0], "--arch", "topk"], "--hook all already means every"),
    (["--hook", HOOKS[1], "--hook", HOOKS[1], "--arch", "topk"],
     f"--hook {HOOKS[1]} is given twice"),
    (["--arch", "topk"], "holds several hooks (blocks.0.hook_resid_post, chat/blocks.1.hook_mlp_"
                         "out); choose one with --hook, several with repeated --hook, or every"),
    (["--hook", "all", "--arch", "crosscoder", "--k", 4], "--k applies to none of the chosen"),
    (["--hook", "all", "--arch", "crosscoder_topk", "--param", "dec_init_norm=0"],
     "dec_init_norm must be > 0 (got 0.0)"),
])
def test_bad_hook_choices_exit_2_with_one_line(two_hooks, tmp_path, monkeypatch, capsys, extra,
                                               message):
    out = tmp_path / "out"
    code, _, err = cli(monkeypatch, capsys, "sweep", "--store", two_hooks, "--out", out,
                       "--width", 8, "--batch-size", 64, "--device", "cpu", *extra)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert message.format(store=two_hooks) in lines[0], lines[0]
    assert not out.exists(), "nothing is written for bad options"


def test_crosscoder_on_one_hook_store_and_hook_all_with_one_hook(tmp_path, monkeypatch, capsys):
    x, _ = make_sparse_data(1024, 8, 16, 2, seed=0)
    write_synthetic_store(tmp_path / "st", x, chunk_rows=256)
    base = ["sweep", "--store", tmp_path / "st", "--batch-size", 64, "--tokens", 640,
            "--device", "cpu"]
    code, _, err = cli(monkeypatch, capsys, *base, "--out", tmp_path / "a", "--arch", "crosscoder",
                       "--width", 16)
    assert code == 2 and "only synthetic is chosen" in err and err.count("\n") == 1
    toml = tmp_path / "s.toml"
    toml.write_text('[[member]]\narch = "crosscoder_topk"\nwidth = 16\nk = 2\n')
    code, _, err = cli(monkeypatch, capsys, *base, "--out", tmp_path / "b", "--config", toml)
    assert code == 2 and "crosscoder_topk reads several hooks" in err
    code, stdout, err = cli(monkeypatch, capsys, *base, "--out", tmp_path / "c", "--hook", "all",
                            "--arch", "topk", "--width", 16, "--k", 2)
    assert code == 0, err
    assert folders(tmp_path / "c") == ["topk-w16-k2-lr6.4e-3"]  # one hook: no prefix
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
