"""shared/store.py: dtype round trips, chunk files for every chunk, and refusing stores that are
missing, foreign or not complete."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from shared.errors import UserError
from shared.store import (
    WORK_DIR,
    Manifest,
    create_store,
    from_storage,
    open_store,
    seal,
    to_storage,
)


def manifest(**kw) -> Manifest:
    base = dict(model="m", hooks=["h"], d_in={"h": 4}, dtype="float32", n_rows=10,
                context_size=8, seed=0, chunk_rows=4)
    return Manifest(**{**base, **kw})


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_storage_round_trip_is_exact_in_the_logical_dtype(dtype):
    x = torch.randn(5, 3).to(getattr(torch, dtype))
    stored = to_storage(x, dtype)
    assert stored.dtype == {"float32": np.float32, "float16": np.float16,
                            "bfloat16": np.uint16}[dtype]
    back = from_storage(stored, dtype)
    assert back.dtype == x.dtype and torch.equal(back, x)


def test_every_chunk_has_a_file_even_an_all_zero_one(tmp_path):
    group = create_store(tmp_path / "s", manifest())
    group["acts/h"][:] = np.zeros((10, 4), np.float32)
    store = open_store(tmp_path / "s", require_complete=False)
    for c in range(store.manifest.n_chunks):  # 3 chunks, the last one padded to 4 rows
        assert store.chunk_file("acts/h", c).stat().st_size == 4 * 4 * 4


def test_open_refuses_missing_foreign_and_incomplete_stores(tmp_path):
    with pytest.raises(UserError, match="no activation store"):
        open_store(tmp_path / "nothing")
    zarr.open_group(str(tmp_path / "foreign"), mode="w", zarr_format=3)
    with pytest.raises(UserError, match="without a manifest"):
        open_store(tmp_path / "foreign")
    create_store(tmp_path / "half", manifest())
    with pytest.raises(UserError, match="not complete"):
        open_store(tmp_path / "half")
    (tmp_path / "scattering" / WORK_DIR).mkdir(parents=True)  # killed before any array existed
    with pytest.raises(UserError, match="not complete.*--resume"):
        open_store(tmp_path / "scattering")


def test_a_complete_store_opens_and_reports_unknown_hooks(tmp_path):
    group = create_store(tmp_path / "s", manifest())
    m = manifest()
    seal(group, m)
    store = open_store(tmp_path / "s")
    assert store.manifest == m
    with pytest.raises(UserError, match="it holds: h"):
        store.check_hook("other")
