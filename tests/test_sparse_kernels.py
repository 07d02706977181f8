"""The sparse TopK-family step (train_sae/dictionaries/sparse.py) against the dense reference:
the same forward values, the same gradients of every parameter, and the same weights after 50
Adam steps (to float tolerance), for every dictionary that has one, with AuxK active."""

from __future__ import annotations

import copy

import pytest
import torch

from train_sae.dictionaries import IO, TrainProgress, build, build_sae
from train_sae.dictionaries.sparse import SparseActs
from train_sae.training.config import SPARSE_MIN_WIDTH, TrainConfig, use_sparse_kernels

WIDTH, BATCH = 96, 64
DEAD = {"dead_tokens_threshold": 2 * BATCH}  # latents idle for two batches are dead: AuxK runs
CASES = {
    "topk": lambda: build_sae("topk", 16, WIDTH, {"k": 4, **DEAD}, 0),
    "topk_aux_normalize": lambda: build_sae("topk", 16, WIDTH, {"k": 4, "aux_normalize": True,
                                                               **DEAD}, 0),
    "batchtopk": lambda: build_sae("batchtopk", 16, WIDTH, {"k": 4, **DEAD}, 0),
    "matryoshka_batchtopk": lambda: build_sae(
        "matryoshka_batchtopk", 16, WIDTH, {"k": 4, "matryoshka_widths": [8, 32, WIDTH], **DEAD},
        0),
    "crosscoder_topk": lambda: build("crosscoder_topk", IO.same({"a": 8, "b": 8}), WIDTH,
                                     {"k": 4, **DEAD}, 0),
    "transcoder": lambda: build("transcoder", IO.of({"a": 16}, {"b": 12}), WIDTH,
                                {"k": 4, **DEAD}, 0),
    "skip_transcoder_batchtopk": lambda: build(
        "skip_transcoder", IO.of({"a": 16}, {"b": 12}), WIDTH,
        {"sparsity": "batchtopk", "k": 4, **DEAD}, 0),
}


def batches(model, steps: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = torch.randn(BATCH, model.d_in, generator=g)
        y = None if model.io.autoencoder else torch.randn(BATCH, model.d_out, generator=g) + \
            x[:, :model.d_out]
        yield step, x, y


def train(model, sparse_on: bool, steps: int):
    model = copy.deepcopy(model)
    model.sparse_kernels = sparse_on
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    outs = []
    for step, x, y in batches(model, steps):
        out = model.training_forward(x, TrainProgress(step, steps, step * BATCH), y)
        opt.zero_grad()
        out.loss.backward()
        outs.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
        model.before_optimizer_step()
        opt.step()
        model.after_optimizer_step()
    return model, outs


@pytest.mark.parametrize("case", sorted(CASES))
def test_sparse_step_equals_the_dense_one(case):
    model = CASES[case]()
    assert model.supports_sparse
    dense, dense_outs = train(model, False, 50)
    sparse, sparse_outs = train(model, True, 50)
    assert int(dense.dead_mask().sum()) > 0, "AuxK was exercised"
    auxes = [float(out.parts["aux"]) for out, _ in dense_outs]
    assert max(auxes) > 0
    for (d, d_grads), (s, s_grads) in zip(dense_outs, sparse_outs, strict=True):
        assert isinstance(s.acts, SparseActs) and not isinstance(d.acts, SparseActs)
        torch.testing.assert_close(s.acts.dense().detach(), d.acts.detach(), rtol=1e-4,
                                   atol=1e-5)
        torch.testing.assert_close(s.x_hat, d.x_hat, rtol=1e-4, atol=1e-5)
        for name in d.parts:
            torch.testing.assert_close(s.parts[name], d.parts[name], rtol=1e-4, atol=1e-5)
        for name, grad in d_grads.items():  # every gradient, every step
            torch.testing.assert_close(s_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)
    for name, value in dense.state_dict().items():  # the weights after 50 Adam steps
        torch.testing.assert_close(sparse.state_dict()[name], value, rtol=1e-3, atol=1e-4,
                                   msg=name)


def test_sparse_acts_know_their_counts():
    model = CASES["topk"]()
    model.sparse_kernels = True
    x = torch.randn(BATCH, 16)
    acts = model.training_forward(x, TrainProgress(0, 1, 0)).acts
    dense = acts.dense()
    assert float(acts.l0()) == pytest.approx(float((dense != 0).sum(-1).float().mean()))
    assert torch.equal(acts.firing_counts(), (dense != 0).sum(0))
    assert torch.equal(dense, model.encode(x))  # the k largest ReLU(pre) of each row


def test_which_members_train_sparse():
    assert use_sparse_kernels("auto", SPARSE_MIN_WIDTH, 32)
    assert not use_sparse_kernels("auto", SPARSE_MIN_WIDTH // 2, 32)
    assert not use_sparse_kernels("auto", SPARSE_MIN_WIDTH, SPARSE_MIN_WIDTH // 2)  # k too large
    assert use_sparse_kernels("torch", 64, 32) and not use_sparse_kernels("dense", 2**20, 32)
    assert use_sparse_kernels("triton", 64, 32)
    assert TrainConfig(store="s", out="o", kernels="sparse").kernels == "torch"  # older name
    clt = build("clt", IO.of({"a": 8, "b": 8}, {"c": 6, "d": 6}), 32, {"k": 2}, 0)
    relu = build_sae("relu", 8, 32, {}, 0)
    assert not clt.supports_sparse and not relu.supports_sparse  # they train dense
    with pytest.raises(Exception, match="--kernels must be one of auto, torch, triton, dense"):
        TrainConfig(store="s", out="o", kernels="cuda")


def test_a_sweep_trains_the_same_with_either_step(tmp_path, monkeypatch, capsys):
    import json

    from conftest import invoke
    from synthetic import make_sparse_data, write_synthetic_store

    from train_sae.cli import main

    x, _ = make_sparse_data(4096, 16, 32, 2, seed=0)
    write_synthetic_store(tmp_path / "store", x, chunk_rows=512)
    finals = {}
    for kernels in ("torch", "dense"):
        code, _, err = invoke(main, "train-sae", monkeypatch, capsys, "sweep", "--store",
                              tmp_path / "store", "--out", tmp_path / kernels, "--arch",
                              "topk,batchtopk", "--width", "64", "--k", "4", "--batch-size", "256",
                              "--device", "cpu", "--kernels", kernels)
        assert code == 0, err
        doc = json.loads((tmp_path / kernels / "sweep.json").read_text())
        assert doc["settings"]["kernels"] == kernels  # a --resume must use the same step
        finals[kernels] = {m["name"]: json.loads((tmp_path / kernels / m["name"] /
                                                  "metrics.json").read_text())["final"]
                           for m in doc["members"]}
    for name, dense in finals["dense"].items():
        for key in ("fvu", "l0", "mse"):
            assert finals["torch"][name][key] == pytest.approx(dense[key], rel=1e-3, abs=1e-5)


def test_triton_kernels_where_they_cannot_run_are_refused(tmp_path, monkeypatch, capsys):
    from conftest import invoke
    from synthetic import make_sparse_data, write_synthetic_store

    from train_sae.cli import main

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, _ = make_sparse_data(1024, 16, 32, 2, seed=0)
    write_synthetic_store(tmp_path / "store", x, chunk_rows=512)
    code, _, err = invoke(main, "train-sae", monkeypatch, capsys, "sweep", "--store",
                          tmp_path / "store", "--out", tmp_path / "out", "--arch", "topk",
                          "--width", "64", "--k", "4", "--batch-size", "256", "--device", "cpu",
                          "--kernels", "triton")
    assert code == 2 and "--kernels triton needs" in err and "--kernels torch" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
