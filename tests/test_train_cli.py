"""`train-sae run/sweep` at the edge: bad options exit 2 with one line and leave nothing behind."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import invoke
from synthetic import make_sparse_data, write_synthetic_store

from shared.store import HookStats, Manifest, create_store, seal
from train_sae.cli import main
from train_sae.training.saving import load_sae


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    x, _ = make_sparse_data(2048, 8, 16, 2, seed=0)
    path = tmp_path_factory.mktemp("s") / "store"
    write_synthetic_store(path, x, chunk_rows=512)
    return path


def cli(monkeypatch, capsys, *args):
    return invoke(main, "train-sae", monkeypatch, capsys, *args)


def base(store, out):
    return ["--store", store, "--out", out, "--batch-size", 128, "--device", "cpu"]


@pytest.mark.parametrize("extra, message", [
    (["--arch", "topk", "--width", 8, "--k", 16], "k"),
    (["--arch", "topk", "--width", 0], "--width must be >= 1"),
    (["--arch", "sparsenet", "--width", 8], "unknown architecture 'sparsenet'"),
    (["--arch", "relu", "--width", 8, "--k", 4], "--k applies to none of the chosen"),
    (["--arch", "relu", "--width", 8, "--hook", "blocks.0.hook_resid_pre"], "is not in store"),
    (["--arch", "topk,relu", "--width", 8], "trains one SAE but the options describe 2"),
    (["--arch", "topk", "--width", 8, "--k", "4.5"], "--k takes whole numbers"),
    (["--arch", "topk", "--width", 8, "--tokens", 10], "at least one batch"),
    (["--arch", "topk", "--width", 8, "--tokens", "lots"], "cannot read count 'lots'"),
    (["--arch", "topk", "--width", 8, "--param", "bandwidth"], "NAME=V1,V2"),
    (["--arch", "topk", "--width", 8, "--lr", "-1"], "--lr must be > 0"),
    (["--arch", "topk", "--width", 8, "--checkpoint-every", "2q"], "cannot read count '2q'"),
    (["--arch", "topk", "--width", 8, "--param", "dead_tokens_threshold=0k"],
     "dead_tokens_threshold must be >= 1 (got 0)"),
    (["--arch", "topk", "--width", 8, "--param", "k=4", "--k", "8"], "k is given twice"),
    (["--width", 8], "no architecture given"),
])
def test_bad_options_exit_2_with_one_line(store, tmp_path, monkeypatch, capsys, extra, message):
    out = tmp_path / "out"
    code, _, err = cli(monkeypatch, capsys, "run", *base(store, out), *extra)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not out.exists(), "nothing is written for bad options"


def test_k_larger_than_width_names_both(store, tmp_path, monkeypatch, capsys):
    code, _, err = cli(monkeypatch, capsys, "sweep", *base(store, tmp_path / "o"),
                       "--arch", "topk", "--width", 8, "--k", "4,16")
    assert code == 2 and "16" in err and "8" in err and err.count("\n") == 1


def test_incomplete_and_multi_hook_stores(tmp_path, monkeypatch, capsys):
    m = Manifest(model="m", hooks=["a", "b"], d_in={"a": 4, "b": 4}, dtype="float32",
                 n_rows=256, context_size=1, seed=0, chunk_rows=256)
    group = create_store(tmp_path / "st", m)
    code, _, err = cli(monkeypatch, capsys, "run", *base(tmp_path / "st", tmp_path / "o"),
                       "--arch", "topk", "--width", 8, "--k", 2)
    assert code == 2 and "not complete" in err
    m.stats = {h: HookStats(mean=[0.0] * 4, mean_norm=1.0) for h in ("a", "b")}
    seal(group, m)
    code, _, err = cli(monkeypatch, capsys, "run", *base(tmp_path / "st", tmp_path / "o"),
                       "--arch", "topk", "--width", 8, "--k", 2)
    assert code == 2 and "several hooks (a, b); choose one with --hook" in err
    assert not (tmp_path / "o").exists()


def test_run_then_refuse_overwrite_resume_and_toml(store, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = [*base(store, out), "--arch", "topk", "--width", 16, "--k", 2, "--tokens", "2.048k",
            "--log-every", 4]  # 2048 tokens: 16 steps of 128
    code, stdout, err = cli(monkeypatch, capsys, "run", *args)
    assert code == 0, err
    assert stdout.startswith("done   topk-w16-k2-lr")
    doc = json.loads((out / "topk-w16-k2-lr6.4e-3" / "metrics.json").read_text())
    assert doc["steps"] == 16 and doc["status"] == "done"
    assert len((out / "topk-w16-k2-lr6.4e-3" / "metrics.jsonl").read_text().splitlines()) == 4

    code, _, err = cli(monkeypatch, capsys, "run", *args)
    assert code == 2 and "--resume" in err and "--overwrite" in err
    code, _, err = cli(monkeypatch, capsys, "run", *args, "--resume")
    assert code == 2 and "already complete" in err
    args[args.index("--k") + 1] = 3
    code, _, err = cli(monkeypatch, capsys, "run", *args, "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["sweep.json", "topk-w16-k3-lr6.4e-3"]

    toml = tmp_path / "s.toml"
    toml.write_text('[[member]]\narch = "topk"\nwidth = 16\nk = 2\n'
                    '[[member]]\narch = "april"\nexpansion = 2\nl1_coefficient = 0.5\n')
    code, stdout, err = cli(monkeypatch, capsys, "sweep", *base(store, tmp_path / "t"),
                            "--config", toml, "--tokens", 1024)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "t").iterdir() if p.is_dir()) == [
        "april-w16-l10.5-lr5e-5", "topk-w16-k2-lr6.4e-3"]
    code, _, err = cli(monkeypatch, capsys, "sweep", *base(store, tmp_path / "u"),
                       "--config", toml, "--arch", "topk")
    assert code == 2 and "either --config or grid options" in err


def test_resume_with_changed_options_is_refused(store, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps({"status": "running", "store": "elsewhere"}))
    code, _, err = cli(monkeypatch, capsys, "run", *base(store, out), "--arch", "topk",
                       "--width", 16, "--k", 2, "--resume")
    assert code == 2 and "is not the one the sweep" in err and "store" in err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    code, _, err = cli(monkeypatch, capsys, "run", *base(store, foreign), "--arch", "topk",
                       "--width", 16, "--k", 2, "--overwrite")
    assert code == 2 and "holds no sweep" in err
    assert (foreign / "notes.txt").exists()


def test_sweep_flags_reach_batchtopk_jumprelu_and_gated(tmp_path, monkeypatch, capsys):
    x, _ = make_sparse_data(8192, 16, 32, 2, seed=0)
    write_synthetic_store(tmp_path / "st", x, chunk_rows=1024)
    out = tmp_path / "sw"
    code, stdout, err = cli(monkeypatch, capsys, "sweep", "--store", tmp_path / "st", "--out", out,
                            "--arch", "batchtopk,jumprelu,gated", "--width", 64, "--k", 4,
                            "--l0", 1.0, "--l1", 1.0, "--lr", 5e-3, "--batch-size", 256,
                            "--tokens", 256 * 128, "--log-every", 16, "--device", "cpu")
    assert code == 0, err
    names = ["batchtopk-w64-k4-lr5e-3", "jumprelu-w64-l0c1-lr5e-3", "gated-w64-l11-lr5e-3"]
    for name in names:
        doc = json.loads((out / name / "metrics.json").read_text())
        first = json.loads((out / name / "metrics.jsonl").read_text().splitlines()[0])
        assert doc["status"] == "done"
        assert doc["final"]["fvu"] < 0.3 and doc["final"]["fvu"] < 0.5 * first["fvu"], name
    assert json.loads((out / names[0] / "metrics.json").read_text())["final"]["l0"] == \
        pytest.approx(4.0, abs=0.5)


def test_normalize_flag_and_saved_weights_take_raw_activations(tmp_path, monkeypatch, capsys):
    """--normalize trains on x * sqrt(d_in) / E||x|| and folds that scale into the saved weights;
    --no-normalize trains on raw x (scale 1). Either way the saved SAE maps raw activations to
    raw reconstructions: its FVU on the raw rows matches the FVU measured during training."""
    x, _ = make_sparse_data(4096, 16, 32, 2, seed=0)
    offset = torch.randn(16, generator=torch.Generator().manual_seed(1))
    x = 0.1 * (x + 3 * offset / offset.norm() * x.norm(dim=1).mean())  # small norm, big mean
    write_synthetic_store(tmp_path / "st", x, chunk_rows=1024)
    expected_scale = {"--normalize": 16 ** 0.5 / float(x.norm(dim=1).mean()), "--no-normalize": 1.0}
    weights = {}
    for mode, scale in expected_scale.items():
        out = tmp_path / mode
        code, _, err = cli(monkeypatch, capsys, "run", *base(tmp_path / "st", out), "--arch",
                           "topk", "--width", 32, "--k", 4, "--lr", 1e-2, "--tokens", 128 * 300,
                           mode)
        assert code == 0, err
        (folder,) = [p for p in out.iterdir() if p.is_dir()]
        doc = json.loads((folder / "metrics.json").read_text())
        sae, cfg = load_sae(folder)
        assert doc["input_scale"] == pytest.approx(scale, rel=1e-4)
        assert cfg["train_sae"]["input_scale"] == pytest.approx(scale, rel=1e-4)
        with torch.no_grad():
            fvu = float(((x - sae(x)) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
        assert fvu < 0.4 and fvu == pytest.approx(doc["final"]["fvu"], abs=0.05), (mode, fvu)
        weights[mode] = sae.W_dec.detach().clone()
    assert expected_scale["--normalize"] > 5  # the two modes differ, and train differently
    assert not torch.allclose(weights["--normalize"], weights["--no-normalize"], atol=1e-3)


def test_cli_import_leaves_out_the_model_and_plotting_libraries():
    """`train-sae run/sweep/--help` must not pay for transformer_lens (seconds) or matplotlib:
    they are imported inside `train-sae eval` / `report` only."""
    code = ("import sys, train_sae.cli; "
            "print(sorted(m for m in ('transformer_lens', 'shared.models', 'matplotlib') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_counts_take_unit_suffixes(store, tmp_path, monkeypatch, capsys):
    code, _, err = cli(monkeypatch, capsys, "run", "--store", store, "--out", tmp_path / "o",
                       "--device", "cpu", "--batch-size", "0.5k", "--tokens", "2k",
                       "--log-every", "1k", "--arch", "topk", "--width", 8, "--k", 2,
                       "--param", "dead_tokens_threshold=10M")
    assert code == 0, err
    doc = json.loads((tmp_path / "o" / "sweep.json").read_text())
    assert (doc["total_steps"], doc["settings"]["batch_size"]) == (4, 500)
    assert doc["members"][0]["params"]["dead_tokens_threshold"] == 10_000_000
