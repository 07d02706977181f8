"""Pass 2 output: whole chunks written once to the store's arrays, with a CRC32 each, and the
per-hook statistics accumulated in float64 while rows are scattered.

Two chunk sinks write the same bytes: `ZarrChunks` goes through the zarr API (any codec),
`RawChunks` writes an uncompressed local array's chunk files itself, skipping zarr's async
machinery. With only the `bytes` codec (little endian) a Zarr v3 chunk file is the chunk's raw
bytes in C order at its full chunk shape, the edge chunk padded with the fill value (Zarr v3 spec,
"bytes" codec and regular chunk grid), so it is chosen only when the array metadata says exactly
that (`raw_chunks_or_none`).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import zarr
from zarr.codecs import BytesCodec
from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding
from zarr.storage import LocalStore

from shared.store import HookStats, checksum, count_nonfinite, from_storage


class StatsSums:
    """Running float64 sums for a hook's mean vector and mean L2 norm."""

    def __init__(self, d_in: int, total: list[float] | None = None, norm_sum: float = 0.0,
                 count: int = 0):
        self.total = np.zeros(d_in, dtype=np.float64) if total is None else np.array(total)
        self.norm_sum = norm_sum
        self.count = count

    def add(self, x: np.ndarray, dtype: str) -> int:
        """x: [n, d_in] in storage dtype; statistics are of the values as stored. Returns the
        number of values that are not finite (NaN or inf), in which case nothing is added.
        Sums and norms are computed in float64: squares of float32 values above ~1e19 would
        overflow float32 (and give mean_norm inf, which would scale every input to 0)."""
        if len(x) == 0:
            return 0
        bad = count_nonfinite(x, dtype)
        if bad:
            return bad
        v64 = from_storage(x, dtype).to(torch.float64).numpy()  # [n, d_in], exact widening
        self.total += v64.sum(0)
        self.norm_sum += float(np.sqrt(np.einsum("ij,ij->i", v64, v64)).sum())
        self.count += len(x)
        return 0

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total.tolist(), "norm_sum": self.norm_sum, "count": self.count}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StatsSums:
        return cls(len(d["total"]), d["total"], d["norm_sum"], d["count"])

    def result(self) -> HookStats:
        assert self.count > 0
        return HookStats(mean=(self.total / self.count).tolist(),
                         mean_norm=self.norm_sum / self.count)


class ChunkSink(Protocol):
    """Writes block [<= chunk_rows, ...] (C-contiguous) as chunk `index` of array `path`."""

    def put(self, path: str, index: int, block: np.ndarray) -> None: ...


class ZarrChunks:
    """Through the zarr API: works for every codec and store."""

    def __init__(self, group: zarr.Group, chunk_rows: int):
        self.group, self.chunk_rows = group, chunk_rows

    def put(self, path: str, index: int, block: np.ndarray) -> None:
        start = index * self.chunk_rows
        self.group[path][start:start + len(block)] = block


class RawChunks:
    """Chunk files of uncompressed little-endian local arrays, written directly. Each file is
    written under a temporary name in `scratch` (same file system) and renamed into place, so a
    crash never leaves a torn chunk."""

    def __init__(self, root: Path, chunk_rows: int, scratch: Path):
        self.root, self.chunk_rows, self.scratch = root, chunk_rows, scratch

    def chunk_file(self, path: str, index: int, ndim: int) -> Path:
        """The default Zarr v3 key encoding: <array>/c/<row chunk>/0/... ."""
        return self.root / path / "c" / str(index) / Path(*["0"] * (ndim - 1))

    def put(self, path: str, index: int, block: np.ndarray) -> None:
        target = self.chunk_file(path, index, block.ndim)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.scratch / f"{path.replace('/', '~')}.{index}.partial"  # one per writer
        pad = (self.chunk_rows - len(block)) * (block.nbytes // max(len(block), 1))
        with open(tmp, "wb") as f:
            f.write(block.data)
            if pad:  # the edge chunk at full chunk shape, zero = the arrays' fill value
                f.write(bytes(pad))
        os.replace(tmp, target)


def raw_chunks_or_none(group: zarr.Group, root: Path, paths: list[str], chunk_rows: int,
                       scratch: Path) -> RawChunks | None:
    """A RawChunks for the group's arrays when all of them are local, little-endian, uncompressed,
    default-key-encoded, chunked by `chunk_rows` rows only and filled with zeros; else None."""
    if not isinstance(group.store, LocalStore) or Path(group.store.root) != root.resolve():
        return None
    for path in paths:
        md = group[path].metadata
        ok = (md.zarr_format == 3
              and tuple(md.codecs) == (BytesCodec(endian="little"),)
              and md.chunk_key_encoding == DefaultChunkKeyEncoding(separator="/")
              and tuple(md.chunk_grid.chunk_shape) == (chunk_rows, *md.shape[1:])
              and md.fill_value == 0 and md.data_type.to_native_dtype().byteorder in "<|="
              and group[path].path == path)
        if not ok:
            return None
    return RawChunks(root, chunk_rows, scratch)


def write_chunk(sink: ChunkSink, index: int, records: np.ndarray) -> dict[str, int]:
    """Write records [<= chunk_rows] as chunk `index` of every array (field name = array path);
    returns each array's CRC32 of the chunk."""
    sums = {}
    for path in records.dtype.names:
        block = np.ascontiguousarray(records[path])
        sink.put(path, index, block)
        sums[path] = checksum(block)
    return sums


class ChunkWriterPool:
    """Writes chunks on `workers` threads while the caller gathers the next ones, and commits
    them in index order on the calling thread (`committed(index, write's result)`), so a commit
    always means "every chunk up to here is on disk". At most `workers` chunks are in flight; a
    write's error is re-raised by the next `submit` or by `finish`."""

    def __init__(self, write: Callable[[int, np.ndarray], Any],
                 committed: Callable[[int, Any], None], workers: int):
        self.write, self.committed, self.workers = write, committed, workers
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="chunk-writer")
        self._in_flight: deque[tuple[int, Future]] = deque()
        self._failed = False

    def submit(self, index: int, records: np.ndarray) -> None:
        self._in_flight.append((index, self._pool.submit(self.write, index, records)))
        while self._in_flight and (len(self._in_flight) > self.workers
                                   or self._in_flight[0][1].done()):
            self._commit_oldest()

    def _commit_oldest(self) -> None:
        index, future = self._in_flight.popleft()
        try:
            self.committed(index, future.result())
        except BaseException:
            self._failed = True  # later chunks may be on disk, but never committed past a gap
            raise

    def finish(self) -> None:
        """Wait for every submitted chunk and commit it, unless a write or commit failed;
        re-raise the first error."""
        try:
            while self._in_flight and not self._failed:
                self._commit_oldest()
        finally:
            self._in_flight.clear()
            self._pool.shutdown(wait=True, cancel_futures=True)
