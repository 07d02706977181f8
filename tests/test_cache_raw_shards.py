"""Pass 2's raw shard files are byte for byte what the zarr API writes for the same records."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import zarr

from cache_acts.rows import array_fields, record_dtype
from cache_acts.writer import (
    ChunkWriterPool,
    RawShards,
    ZarrShards,
    raw_shards_or_none,
    write_chunk,
)
from shared.store import Manifest, create_store


def _manifest(n_rows: int, dtype: str, compression: str | None = None, shard_rows: int = 16
              ) -> Manifest:
    return Manifest(model="m", hooks=["h"], d_in={"h": 5}, dtype=dtype, n_rows=n_rows,
                    context_size=4, seed=0, chunk_rows=8, shard_rows=shard_rows,
                    compression=compression)


def _records(n: int, dtype: str, rng: np.random.Generator) -> np.ndarray:
    rec = record_dtype(["h"], {"h": 5}, dtype)
    r = np.empty(n, dtype=rec)
    r["acts/h"] = rng.integers(0, 2**15, (n, 5)) if dtype == "bfloat16" else rng.normal(size=(n, 5))
    for name in ("token_ids", "seq_index", "position"):
        r[name] = rng.integers(-2**30, 2**30, n)
    return r


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("n", [21, 40])  # the last shard holds 1 chunk (short) or 1 of 2 (full)
def test_raw_shards_equal_zarr_api(tmp_path, dtype, n):
    rng = np.random.default_rng(0)
    records = _records(n, dtype, rng)
    m = _manifest(n, dtype)
    n_chunks = -(-n // 8)
    sums: dict[str, dict[int, dict[str, int]]] = {"raw": {}, "zarr": {}}
    for kind in ("raw", "zarr"):
        group = create_store(tmp_path / kind, m)
        sink = raw_shards_or_none(group, tmp_path / kind, m, tmp_path)
        assert isinstance(sink, RawShards)
        if kind == "zarr":
            sink = ZarrShards(group, 8, 16, n)
        for i in reversed(range(n_chunks)):  # any order, like two writer threads
            sums[kind][i] = write_chunk(sink, i, records[8 * i:8 * i + 8])
        for shard in range(-(-n_chunks // 2)):
            sink.seal(shard)
    assert sums["raw"] == sums["zarr"]
    raw, ref = zarr.open_group(str(tmp_path / "raw"), mode="r"), zarr.open_group(str(tmp_path / "zarr"), mode="r")
    for path in array_fields(records.dtype):
        assert np.array_equal(raw[path][:], records[path]), path
        assert np.array_equal(raw[path][:], ref[path][:]), path
        for shard in range(-(-n_chunks // 2)):
            key = f"{path}/c/{shard}" + ("/0" if path.startswith("acts") else "")
            assert (tmp_path / "raw" / key).read_bytes() == (tmp_path / "zarr" / key).read_bytes()
    assert not list(tmp_path.glob("*.partial"))  # renamed into place


def test_a_resealed_shard_drops_an_older_longer_attempt(tmp_path):
    """A resumed pass 2 rewrites an unsealed shard over the partial file of the killed run."""
    m = _manifest(12, "float32")
    records = _records(12, "float32", np.random.default_rng(1))
    group = create_store(tmp_path / "s", m)
    sink = raw_shards_or_none(group, tmp_path / "s", m, tmp_path)
    partial = tmp_path / "acts~h.0.partial"
    partial.write_bytes(b"\xff" * 1000)  # longer than the shard's data, garbage throughout
    for i in range(2):
        write_chunk(sink, i, records[8 * i:8 * i + 8])
    sink.seal(0)
    assert np.array_equal(zarr.open_group(str(tmp_path / "s"), mode="r")["acts/h"][:],
                          records["acts/h"])


def test_compressed_or_unsharded_stores_go_through_zarr(tmp_path):
    m = _manifest(16, "float32", compression="zstd")
    group = create_store(tmp_path / "z", m)
    assert raw_shards_or_none(group, tmp_path / "z", m, tmp_path) is None
    m = _manifest(16, "float32")
    group = create_store(tmp_path / "r", m)
    m.shard_rows = 32  # the arrays say 16
    assert raw_shards_or_none(group, tmp_path / "r", m, tmp_path) is None


def test_writer_pool_commits_in_order_and_never_past_a_failed_chunk():
    """Chunk 3 finishes before chunk 2 fails: 3 is on disk but must not be committed."""
    chunk_3_written = threading.Event()
    committed: list[int] = []

    def write(index: int, records: np.ndarray) -> int:
        if index == 2:
            assert chunk_3_written.wait(timeout=10)
            raise OSError("disk full")
        if index == 3:
            chunk_3_written.set()
        return index * 10

    pool = ChunkWriterPool(write, lambda i, result: committed.append((i, result)), workers=2)
    with pytest.raises(OSError, match="disk full"):
        for i in range(6):
            pool.submit(i, np.zeros(1))
        pool.finish()
    pool.finish()  # after a failure: waits, commits nothing more, raises nothing new
    assert committed == [(0, 0), (1, 10)]
