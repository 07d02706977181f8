"""Synthetic data with planted directions and the store written from it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from synthetic import make_sparse_data, mean_max_cosine, write_synthetic_store

from shared.errors import UserError
from shared.store import checksum, open_store


def test_sparse_data_is_seeded_and_has_the_planted_mean():
    x, dirs = make_sparse_data(20_000, 16, 40, n_active=4, seed=7, magnitude=(0.5, 1.5))
    x2, dirs2 = make_sparse_data(20_000, 16, 40, n_active=4, seed=7, magnitude=(0.5, 1.5))
    x3, _ = make_sparse_data(20_000, 16, 40, n_active=4, seed=8, magnitude=(0.5, 1.5))
    assert x.shape == (20_000, 16) and x.dtype == torch.float32 and dirs.shape == (40, 16)
    assert torch.equal(x, x2) and torch.equal(dirs, dirs2) and not torch.equal(x, x3)
    torch.testing.assert_close(dirs.norm(dim=1), torch.ones(40))
    # E[x] = P(fire) * E[magnitude] * sum of directions = (4/40) * 1.0 * sum
    torch.testing.assert_close(x.mean(0), 0.1 * dirs.sum(0), atol=0.02, rtol=0)


def test_sparse_data_rows_are_nonnegative_mixtures():
    x, dirs = make_sparse_data(500, 8, 8, n_active=2, seed=0, noise=0.0, magnitude=(1.0, 1.0))
    coeffs = torch.linalg.solve(dirs.T.double(), x.T.double()).T  # 8 independent directions
    rounded = coeffs.round()
    torch.testing.assert_close(coeffs, rounded, atol=1e-6, rtol=0)
    assert set(rounded.unique().tolist()) <= {0.0, 1.0}
    assert rounded.sum(1).mean().item() == pytest.approx(2.0, abs=0.25)


def test_mean_max_cosine():
    _, dirs = make_sparse_data(10, 16, 20, 2, seed=0)
    perm = torch.randperm(20)
    decoder = torch.cat([3.0 * dirs[perm], torch.randn(5, 16)])  # scaled, shuffled, extras
    assert mean_max_cosine(decoder, dirs) == pytest.approx(1.0, abs=1e-6)
    half = dirs.clone()
    half[:10] = -half[:10]  # the opposite direction has cosine -1, not 1
    assert mean_max_cosine(half[:10], dirs[:10]) < 0.9
    assert mean_max_cosine(torch.randn(20, 16), dirs) < 0.9


@pytest.mark.parametrize("bad", [{"n_active": 0}, {"n_active": 50}, {"n_rows": 0}])
def test_sparse_data_bad_arguments(bad):
    args = {"n_rows": 10, "d_in": 4, "n_directions": 8, "n_active": 2, "seed": 0, **bad}
    with pytest.raises(UserError):
        make_sparse_data(**args)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_write_synthetic_store(tmp_path, dtype):
    x, _ = make_sparse_data(2500, 12, 20, 3, seed=1)
    store = write_synthetic_store(tmp_path / "s.zarr", x, hook="h", seed=3, chunk_rows=1000,
                                  dtype=dtype)
    m = store.manifest
    assert m.complete and m.hooks == ["h"] and m.d_in == {"h": 12} and m.n_rows == 2500
    assert m.n_chunks == 3 and m.seed == 3 and m.dtype == dtype
    again = open_store(tmp_path / "s.zarr")
    rows = again.read_rows("h", 0, 2500)
    expected = x.to(rows.dtype)
    assert torch.equal(rows, expected)
    stats = m.stats["h"]
    np.testing.assert_allclose(stats.mean, expected.double().mean(0).numpy(), rtol=1e-9)
    assert stats.mean_norm == pytest.approx(expected.double().norm(dim=1).mean().item(), rel=1e-9)
    for path in m.array_paths():
        array = again.array(path)
        sums = [checksum(array[s : s + 1000]) for s in range(0, 2500, 1000)]
        assert m.checksums[path] == sums
    assert again.array("seq_index")[:].tolist() == list(range(2500))


def test_write_synthetic_store_refuses_existing(tmp_path):
    x, _ = make_sparse_data(10, 4, 8, 2, seed=0)
    write_synthetic_store(tmp_path / "s.zarr", x)
    with pytest.raises(UserError, match="already exists"):
        write_synthetic_store(tmp_path / "s.zarr", x)
    store = write_synthetic_store(tmp_path / "s.zarr", 2 * x, overwrite=True)
    assert torch.equal(store.read_rows("synthetic", 0, 10), 2 * x)
