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
    HookStats,
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


@pytest.mark.parametrize("shard_rows", [None, 8])
def test_every_chunk_is_stored_even_an_all_zero_one(tmp_path, shard_rows):
    """Unsharded: a file per chunk; sharded: every chunk in its shard's index, full size."""
    group = create_store(tmp_path / "s", manifest(shard_rows=shard_rows))
    group["acts/h"][:] = np.zeros((10, 4), np.float32)
    store = open_store(tmp_path / "s", require_complete=False)
    assert store.manifest.n_objects == (3 if shard_rows is None else 2)
    for c in range(store.manifest.n_chunks):  # 3 chunks, the last one padded to 4 rows
        span = store.chunk_span("acts/h", c)
        assert span.nbytes == 4 * 4 * 4
        assert span.offset == (0 if shard_rows is None else (c % 2) * 64)
        assert span.file == store.object_file("acts/h", c if shard_rows is None else c // 2)


def test_sharded_stores_open_in_plain_zarr_and_need_few_objects(tmp_path):
    """Format 2 is plain Zarr v3 sharding: zarr reads it unchanged, one object per shard."""
    m = manifest(n_rows=1000, chunk_rows=16, shard_rows=320, d_in={"h": 3})
    group = create_store(tmp_path / "s", m)
    x = np.random.default_rng(0).normal(size=(1000, 3)).astype(np.float32)
    group["acts/h"][:] = x
    seal(group, m)
    plain = zarr.open_array(str(tmp_path / "s" / "acts" / "h"), mode="r")
    assert plain.shape == (1000, 3) and plain.chunks == (16, 3) and plain.shards == (320, 3)
    assert np.array_equal(plain[:], x)
    files = [p for p in (tmp_path / "s" / "acts" / "h" / "c").rglob("*") if p.is_file()]
    assert len(files) == 4 == m.n_objects  # 63 chunks in 4 shards (an unsharded store: 63)
    store = open_store(tmp_path / "s")
    span = store.chunk_span("acts/h", 62)  # the last, short chunk: rows 992-999, padded
    rows = np.fromfile(span.file, np.float32, count=16 * 3, offset=span.offset).reshape(16, 3)
    assert np.array_equal(rows[:8], x[992:]) and not rows[8:].any()


def test_format_1_stores_still_load_train_and_verify(tmp_path):
    """A store as the previous version wrote it: format 1, a file per chunk, no shard_rows."""
    from cache_acts.inspect_store import verify
    from train_sae.training.loader import ActivationLoader

    m = manifest(n_rows=64, chunk_rows=16, format_version=1)
    group = create_store(tmp_path / "v1", m)
    x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    group["acts/h"][:] = x
    m.stats = {"h": HookStats(mean=[0.0] * 4, mean_norm=2.0)}
    seal(group, m)
    attrs = dict(group.attrs["manifest"])
    del attrs["shard_rows"]  # the field did not exist
    group.attrs["manifest"] = attrs
    store = open_store(tmp_path / "v1")
    assert store.manifest.format_version == 1 and store.manifest.shard_rows is None
    assert (tmp_path / "v1" / "acts" / "h" / "c" / "3" / "0").is_file()
    (batch,) = list(ActivationLoader(store, ["h"], 64, 1, normalize=False))
    assert sorted(batch["h"][:, 0].tolist()) == sorted(x[:, 0].tolist())
    assert verify(tmp_path / "v1", progress=False).startswith("ok:")


def test_shard_rows_must_be_a_multiple_of_chunk_rows():
    from shared.store import resolve_shard_rows
    with pytest.raises(UserError, match="--shard-rows 100 must be a whole multiple of "
                                        "--chunk-rows 64 .e.g. 64 or 128"):
        resolve_shard_rows(100, 64, {"h": 8}, "float32", 10**6)
    big = 10**9
    assert resolve_shard_rows(None, 4096, {"a": 2048, "b": 64}, "bfloat16", big) == 32768  # 128 MiB
    assert resolve_shard_rows(None, 4096, {"a": 1 << 16}, "float32", big) == 4096  # >= a chunk
    assert resolve_shard_rows(None, 64, {"a": 8}, "float32", 1033) == 17 * 64  # the whole store


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
