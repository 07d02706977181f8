"""Pass 2's raw chunk files are byte for byte what the zarr API writes for the same records."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import zarr

from cache_acts.rows import record_dtype
from cache_acts.writer import (
    ChunkWriterPool,
    RawChunks,
    ZarrChunks,
    raw_chunks_or_none,
    write_chunk,
)
from shared.store import Manifest, create_store


def _manifest(n_rows: int, dtype: str, compression: str | None = None) -> Manifest:
    return Manifest(model="m", hooks=["h"], d_in={"h": 5}, dtype=dtype, n_rows=n_rows,
                    context_size=4, seed=0, chunk_rows=8, compression=compression)


def _records(n: int, dtype: str, rng: np.random.Generator) -> np.ndarray:
    rec = record_dtype(["h"], {"h": 5}, dtype)
    r = np.empty(n, dtype=rec)
    r["acts/h"] = rng.integers(0, 2**15, (n, 5)) if dtype == "bfloat16" else rng.normal(size=(n, 5))
    for name in ("token_ids", "seq_index", "position"):
        r[name] = rng.integers(-2**30, 2**30, n)
    return r


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_raw_chunks_equal_zarr_api(tmp_path, dtype):
    n = 21  # 3 chunks of 8, the last one short (zero-padded on disk)
    rng = np.random.default_rng(0)
    records = _records(n, dtype, rng)
    sums: dict[str, dict[int, dict[str, int]]] = {"raw": {}, "zarr": {}}
    for kind in ("raw", "zarr"):
        group = create_store(tmp_path / kind, _manifest(n, dtype))
        paths = _manifest(n, dtype).array_paths()
        sink = raw_chunks_or_none(group, tmp_path / kind, paths, 8, tmp_path)
        assert isinstance(sink, RawChunks)
        if kind == "zarr":
            sink = ZarrChunks(group, 8)
        for i in (2, 0, 1):  # any order, like a resumed pass 2
            sums[kind][i] = write_chunk(sink, i, records[8 * i:8 * i + 8])
    assert sums["raw"] == sums["zarr"]
    raw, ref = zarr.open_group(str(tmp_path / "raw"), mode="r"), zarr.open_group(str(tmp_path / "zarr"), mode="r")
    for path in records.dtype.names:
        assert np.array_equal(raw[path][:], records[path]), path
        assert np.array_equal(raw[path][:], ref[path][:]), path
        for i in range(3):
            key = f"{path}/c/{i}" + ("/0" if path.startswith("acts") else "")
            assert (tmp_path / "raw" / key).read_bytes() == (tmp_path / "zarr" / key).read_bytes()
    assert not list(tmp_path.glob("*.partial"))  # renamed into place


def test_compressed_stores_go_through_zarr(tmp_path):
    m = _manifest(16, "float32", compression="zstd")
    group = create_store(tmp_path / "z", m)
    assert raw_chunks_or_none(group, tmp_path / "z", m.array_paths(), 8, tmp_path) is None
    m = _manifest(16, "float32")
    group = create_store(tmp_path / "r", m)
    assert raw_chunks_or_none(group, tmp_path / "r", m.array_paths(), 4, tmp_path) is None


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
