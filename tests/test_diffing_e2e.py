"""Model diffing end to end: `cache-acts run` with two models into one store, then a crosscoder
sweep on it through `train-sae sweep`.

The planted answer: "chat" is the very same random model as "base" (same config, same seed), so
every feature lives in both models and every live latent must come out shared (relative decoder
norm near 0.5). Misaligned rows, a per-hook scaling bug or a wrong norm sum would push latents
towards 0 or 1. A second store pairs base with an unrelated model to show the measure moves.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import invoke
from safetensors.torch import load_file

from cache_acts.cli import main as cache_main
from train_sae.cli import main as train_main
from train_sae.evaluation.crosscoder_metrics import relative_decoder_norms
from train_sae.training.crosscoder_saving import load_crosscoder

CTX = 16
HOOK = "blocks.0.hook_resid_post"
BASE = dict(n_layers=1, d_model=16, d_mlp=32, n_heads=2, d_head=8, d_vocab=50, n_ctx=32,
            act_fn="relu", normalization_type="LN", seed=0)
OTHER = {**BASE, "seed": 7}


def run(main, prog: str, monkeypatch, capsys, *argv) -> None:
    code, _, err = invoke(main, prog, monkeypatch, capsys, *argv)
    assert code == 0, err


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffing")
    for name, cfg in [("base", BASE), ("other", OTHER)]:
        (root / f"{name}.json").write_text(json.dumps(cfg))
    ids = np.random.default_rng(0).integers(0, 50, size=(400, CTX))
    pq.write_table(pa.table({"ids": ids.tolist()}), root / "tok.parquet")
    return root


def diff_crosscoder(root, tmp_path, monkeypatch, capsys, chat: str):
    store, sweep = tmp_path / "store", tmp_path / "sweep"
    run(cache_main, "cache-acts", monkeypatch, capsys, "run",
        "--model", f"base=random:{root / 'base.json'}", "--model", f"chat=random:{root / chat}.json",
        "--dataset", root / "tok.parquet", "--token-column", "ids", "--context-size", CTX,
        "--no-bos", "--hook", HOOK, "--batch-size", 16, "--chunk-rows", 512, "--device", "cpu",
        "--out", store)
    run(train_main, "train-sae", monkeypatch, capsys, "sweep", "--store", store, "--out", sweep,
        "--hook", f"base/{HOOK}", "--hook", f"chat/{HOOK}", "--arch", "crosscoder_topk",
        "--width", 64, "--k", 4, "--lr", 3e-3, "--batch-size", 256, "--tokens", 256 * 300,
        "--device", "cpu", "--log-every", 100)
    (folder,) = [p for p in sweep.iterdir() if p.is_dir()]
    cc, cfg = load_crosscoder(folder)
    assert cc.hooks == [f"base/{HOOK}", f"chat/{HOOK}"]
    rel = relative_decoder_norms(cc.W_dec, cc.splits, input_scales=cfg["input_scales_folded"])
    metrics = json.loads((folder / "metrics.json").read_text())
    log_density = load_file(str(folder / "sparsity.safetensors"))["sparsity"]
    live = log_density > -10  # latents that fired: dead ones keep their random initial direction
    assert live.sum() >= 16, log_density
    return rel[live], metrics


def test_identical_models_give_only_shared_latents(data, tmp_path, monkeypatch, capsys):
    rel, metrics = diff_crosscoder(data, tmp_path, monkeypatch, capsys, "base")
    assert metrics["final"]["fvu/base/" + HOOK] < 0.4, metrics["final"]
    assert ((rel - 0.5).abs() < 0.02).all(), rel
    assert metrics["relative_norms"]["shared"] >= rel.numel()
    assert metrics["relative_norms"]["labels"] == ["base", "chat"]


def test_unrelated_models_move_latents_off_shared(data, tmp_path, monkeypatch, capsys):
    rel, _ = diff_crosscoder(data, tmp_path, monkeypatch, capsys, "other")
    assert (rel - 0.5).abs().mean() > 0.03, rel  # identical models stay within 0.02 of 0.5
