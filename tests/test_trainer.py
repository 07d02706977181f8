"""The one-pass sweep trainer on synthetic stores: learning, failure isolation, outputs, W&B."""

import json

import pytest
import torch
from synthetic import make_sparse_data, mean_max_cosine, write_synthetic_store

from train_sae.training.config import TrainConfig
from train_sae.training.sweep import make_member
from train_sae.training.trainer import prepare, train

BATCH = 256


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    x, directions = make_sparse_data(8192, 16, 32, 2, seed=0)
    path = tmp_path_factory.mktemp("store") / "store"
    write_synthetic_store(path, x, chunk_rows=1024)
    return path, directions


def run_sweep(store, out, members_given, tokens=65536, **kw):
    cfg = TrainConfig(store=str(store), out=str(out), batch_size=BATCH, tokens=tokens,
                      log_every=32, device="cpu", **kw)
    plan = prepare(cfg)
    members = [make_member(arch, width, dict(given), BATCH, plan.total_steps)
               for arch, width, given in members_given]
    return plan, train(cfg, plan, members)


GOOD = [("topk", 64, {"k": 4, "lr": 5e-3}),
        ("relu", 64, {"l1_coefficient": 1.0, "lr": 5e-3}),
        ("april", 64, {"l1_coefficient": 1.0, "lr": 5e-3})]


def test_sweep_learns_planted_directions(synthetic, tmp_path):
    store, directions = synthetic
    plan, results = run_sweep(store, tmp_path / "sw", GOOD)
    assert plan.total_steps == 256
    from train_sae.training.saving import load_sae

    for r in results:
        assert r.status == "done"
        sae, _ = load_sae(r.folder)
        assert mean_max_cosine(sae.W_dec, directions) >= 0.9, r.name
        lines = [json.loads(s) for s in (r.folder / "metrics.jsonl").read_text().splitlines()]
        assert [rec["step"] for rec in lines] == list(range(32, 257, 32))
        assert lines[0]["fvu"] > lines[-1]["fvu"]  # it kept learning during the run
        assert r.final["fvu"] < 0.15
        doc = json.loads((r.folder / "metrics.json").read_text())
        assert doc["status"] == "done" and doc["failure"] is None
        assert doc["tokens"] == 256 * BATCH and doc["steps"] == 256
        assert set(doc["final"]) == {"l0", "mse", "fvu", "cos_sim", "l2_ratio", "dead_fraction",
                                     "dense_fraction"}
    topk = next(r for r in results if r.name.startswith("topk"))
    assert topk.final["l0"] == pytest.approx(4.0, abs=0.05)
    sweep = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert sweep["status"] == "complete" and len(sweep["members"]) == 3
    assert sweep["store"] == str(store.resolve())
    assert not (tmp_path / "sw" / "checkpoint.pt").exists()


def test_failing_member_is_stopped_and_others_are_unchanged(synthetic, tmp_path):
    store, _ = synthetic
    bad = ("topk", 64, {"k": 4, "lr": 1e6})
    _, with_bad = run_sweep(store, tmp_path / "a", [GOOD[0], bad, GOOD[1]], tokens=16384)
    _, without = run_sweep(store, tmp_path / "b", [GOOD[0], GOOD[1]], tokens=16384)
    failed = [r for r in with_bad if r.status == "failed"]
    assert [r.name for r in failed] == ["topk-w64-k4-lr1e6"]
    doc = json.loads((failed[0].folder / "metrics.json").read_text())
    assert doc["status"] == "failed" and "--lr" in doc["failure"]
    assert doc["final"] is None
    assert not (failed[0].folder / "sae_weights.safetensors").exists()
    for r in without:
        twin = tmp_path / "a" / r.name
        for f in ("sae_weights.safetensors", "sparsity.safetensors", "metrics.jsonl"):
            assert (twin / f).read_bytes() == (r.folder / f).read_bytes(), (r.name, f)
    sweep = json.loads((tmp_path / "a" / "sweep.json").read_text())
    assert sweep["results"]["topk-w64-k4-lr1e6"] == "failed"


def test_saved_sae_reconstructs_raw_activations(synthetic, tmp_path):
    store, _ = synthetic
    _, (r,) = run_sweep(store, tmp_path / "sw", [GOOD[0]])
    from shared.store import open_store
    from train_sae.evaluation.metrics import fvu
    from train_sae.training.saving import load_sae

    s = open_store(store)
    x = s.read_rows("synthetic", 0, 2048).float()  # raw, unscaled rows
    sae, _ = load_sae(r.folder)
    with torch.no_grad():
        raw_fvu = float(fvu(x, sae(x)))
    assert raw_fvu == pytest.approx(r.final["fvu"], abs=0.03)
    scale = json.loads((r.folder / "metrics.json").read_text())["input_scale"]
    assert scale == pytest.approx(16**0.5 / s.manifest.stats["synthetic"].mean_norm)


def test_wandb_offline_logs_every_member(synthetic, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    store, _ = synthetic
    run_sweep(store, tmp_path / "sw", GOOD[:2], tokens=8192, wandb_project="sae-test")
    runs = list((tmp_path / "sw" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb")), "the offline run recorded data"
