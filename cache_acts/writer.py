"""Pass 2 output: whole row chunks written once into the store's shards, with a CRC32 each, and
the per-hook statistics accumulated in float64 while rows are scattered.

Two shard sinks write the same bytes: `ZarrShards` goes through the zarr API (any codec, any
store), `RawShards` writes an uncompressed local array's shard files itself, skipping zarr's
async machinery. With only the `bytes` codec (little endian) inside the sharding codec, a shard
is its chunks' raw bytes in C order at full chunk shape, the edge chunk padded with the fill
value, then the index (shared/shards.py), so it is chosen only when the array metadata says
exactly that (`raw_shards_or_none`).
"""

from __future__ import annotations

import math
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ShardingCodecIndexLocation
from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding
from zarr.storage import LocalStore

from cache_acts.rows import array_fields
from shared import shards
from shared.store import HookStats, Manifest, checksum, from_storage


class SequenceFile:
    """Pass 1's copy of the packed token sequences (`RowBatch.sequences`), kept in the work
    folder as raw int32 rows [sequence, context_size]: every rank writes its batches' sequences
    at their place (so the file is the same whoever ran them), a resumed run writes the same
    bytes again, and pass 2 copies it into the store's `sequences` array
    (shared.store.write_sequences). A batch's sequences are written before the commit that
    covers its rows, so after pass 1 the file holds exactly the sequences the rows come from."""

    NAME = "sequences.bin"

    def __init__(self, folder: Path, context_size: int):
        self.path = folder / self.NAME
        self.row_bytes = 4 * context_size
        self.context_size = context_size

    def write(self, first: int, sequences: np.ndarray) -> None:
        block = np.ascontiguousarray(sequences, dtype="<i4")
        assert block.shape[1] == self.context_size
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, block.data, first * self.row_bytes)
        finally:
            os.close(fd)

    def rows(self) -> np.ndarray:
        """The sequences written, memory-mapped read-only: [n_sequences, context_size]; empty
        when there are none."""
        size = self.path.stat().st_size if self.path.exists() else 0
        assert size % self.row_bytes == 0, (self.path, size)
        if size == 0:
            return np.zeros((0, self.context_size), dtype="<i4")
        return np.memmap(self.path, dtype="<i4", mode="r", shape=(size // self.row_bytes,
                                                                   self.context_size))


@dataclass
class BatchSums:
    """One batch's float64 sums for a hook's statistics (`batch_sums`)."""

    total: np.ndarray  # [d_in] sum of the rows
    norm_sum: float  # sum of the rows' L2 norms
    count: int


def batch_sums(x: np.ndarray, dtype: str) -> BatchSums:
    """x: [n, d_in] finite values in storage dtype; statistics are of the values as stored.
    Sums and norms are computed in float64: squares of float32 values above ~1e19 would
    overflow float32 (and give mean_norm inf, which would scale every input to 0)."""
    v64 = from_storage(x, dtype).to(torch.float64).numpy()  # [n, d_in], exact widening
    return BatchSums(v64.sum(0), float(np.sqrt(np.einsum("ij,ij->i", v64, v64)).sum()), len(x))


class StatsSums:
    """Running float64 sums for a hook's mean vector and mean L2 norm. Batches are added in
    source order, whichever rank ran them, so the sums are the same for any number of ranks."""

    def __init__(self, d_in: int, total: list[float] | None = None, norm_sum: float = 0.0,
                 count: int = 0):
        self.total = np.zeros(d_in, dtype=np.float64) if total is None else np.array(total)
        self.norm_sum = norm_sum
        self.count = count

    def add(self, s: BatchSums) -> None:
        self.total += s.total
        self.norm_sum += s.norm_sum
        self.count += s.count

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total.tolist(), "norm_sum": self.norm_sum, "count": self.count}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StatsSums:
        return cls(len(d["total"]), d["total"], d["norm_sum"], d["count"])

    def result(self) -> HookStats:
        assert self.count > 0
        return HookStats(mean=(self.total / self.count).tolist(),
                         mean_norm=self.norm_sum / self.count)


class ShardSink(Protocol):
    """Pass 2's output: `put` writes block [<= chunk_rows, ...] (C-contiguous) as row chunk
    `chunk` of array `path` (from any writer thread, in any order); once every chunk of shard
    `shard` was put, `seal(shard)` makes it durable and visible (on the committing thread)."""

    def put(self, path: str, chunk: int, block: np.ndarray) -> None: ...

    def seal(self, shard: int) -> None: ...


class ZarrShards:
    """Through the zarr API, for every codec and store: the chunks of a shard are gathered in
    memory (one shard of every array: shard_rows x the row's bytes) and written as one shard
    object, so no shard is ever read back and rewritten (costly on object stores)."""

    def __init__(self, group: zarr.Group, chunk_rows: int, shard_rows: int, n_rows: int):
        self.group, self.chunk_rows, self.shard_rows, self.n_rows = (
            group, chunk_rows, shard_rows, n_rows)
        self._buffers: dict[int, dict[str, np.ndarray]] = {}  # shard -> path -> [shard rows, ...]
        self._lock = threading.Lock()

    def put(self, path: str, chunk: int, block: np.ndarray) -> None:
        start = chunk * self.chunk_rows
        shard, into = divmod(start, self.shard_rows)
        with self._lock:
            buffers = self._buffers.setdefault(shard, {})
            if path not in buffers:
                rows = min(self.shard_rows, self.n_rows - shard * self.shard_rows)
                buffers[path] = np.empty((rows, *block.shape[1:]), dtype=block.dtype)
            buf = buffers[path]
        buf[into:into + len(block)] = block

    def seal(self, shard: int) -> None:
        start = shard * self.shard_rows
        for path, buf in self._buffers.pop(shard).items():
            self.group[path][start:start + len(buf)] = buf


class RawShards:
    """Shard objects of uncompressed little-endian local arrays, written directly (no zarr
    overhead; the same bytes, see shared/shards.py): each chunk goes to its offset in a
    temporary shard file in `scratch` (same file system); `seal` appends the index and renames
    the file into place, so a crash never leaves a torn shard."""

    def __init__(self, root: Path, group: zarr.Group, paths: list[str], chunk_rows: int,
                 shard_rows: int, n_rows: int, scratch: Path):
        self.root, self.chunk_rows, self.scratch = root, chunk_rows, scratch
        self.per_shard = shard_rows // chunk_rows
        self.n_chunks = -(-n_rows // chunk_rows)
        # path -> bytes of one full chunk, and whether the array is 2-d
        self.chunk_nbytes = {p: chunk_rows * math.prod(group[p].shape[1:]) * group[p].dtype.itemsize
                             for p in paths}
        self.ndim = {p: len(group[p].shape) for p in paths}

    def _partial(self, path: str, shard: int) -> Path:
        return self.scratch / f"{path.replace('/', '~')}.{shard}.partial"

    def put(self, path: str, chunk: int, block: np.ndarray) -> None:
        shard, inner = divmod(chunk, self.per_shard)
        nbytes = self.chunk_nbytes[path]
        fd = os.open(self._partial(path, shard), os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, block.data, inner * nbytes)
            if block.nbytes < nbytes:  # the edge chunk at full chunk shape, zero = fill value
                os.pwrite(fd, bytes(nbytes - block.nbytes), inner * nbytes + block.nbytes)
        finally:
            os.close(fd)

    def seal(self, shard: int) -> None:
        present = min(self.per_shard, self.n_chunks - shard * self.per_shard)
        for path, nbytes in self.chunk_nbytes.items():
            tmp = self._partial(path, shard)
            with open(tmp, "r+b") as f:
                f.truncate(present * nbytes)  # a resumed shard may hold a longer, older attempt
                f.seek(0, os.SEEK_END)
                f.write(shards.index_bytes(self.per_shard, present, nbytes))
            target = self.root / path / "c" / Path(str(shard), *["0"] * (self.ndim[path] - 1))
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, target)


def raw_shards_or_none(group: zarr.Group, root: Path, manifest: Manifest, scratch: Path
                       ) -> RawShards | None:
    """A RawShards for the group's arrays when all of them are local, sharded by the manifest's
    shard_rows into chunk_rows-row inner chunks, little-endian, uncompressed, default-key-encoded
    and filled with zeros (the layout shared/shards.py describes); else None."""
    if not isinstance(group.store, LocalStore) or Path(group.store.root) != root.resolve():
        return None
    paths = manifest.array_paths()
    for path in paths:
        md = group[path].metadata
        rest = tuple(md.shape[1:])
        sharding = ShardingCodec(chunk_shape=(manifest.chunk_rows, *rest),
                                 codecs=(BytesCodec(endian="little"),),
                                 index_codecs=(BytesCodec(endian="little"), Crc32cCodec()),
                                 index_location=ShardingCodecIndexLocation.end)
        ok = (md.zarr_format == 3 and manifest.shard_rows is not None
              and tuple(md.codecs) == (sharding,)
              and md.chunk_key_encoding == DefaultChunkKeyEncoding(separator="/")
              and tuple(md.chunk_grid.chunk_shape) == (manifest.shard_rows, *rest)
              and md.fill_value == 0 and md.data_type.to_native_dtype().byteorder in "<|="
              and group[path].path == path)
        if not ok:
            return None
    return RawShards(root, group, paths, manifest.chunk_rows, manifest.shard_rows,
                     manifest.n_rows, scratch)


def write_chunk(sink: ShardSink, index: int, records: np.ndarray) -> dict[str, int]:
    """Write records [<= chunk_rows] as chunk `index` of every array (field name = array path);
    returns each array's CRC32 of the chunk."""
    sums = {}
    for path in array_fields(records.dtype):
        block = np.ascontiguousarray(records[path])
        sink.put(path, index, block)
        sums[path] = checksum(block)
    return sums


class ChunkWriterPool:
    """Writes chunks on `workers` threads while the caller gathers the next ones, and commits
    them in index order on the calling thread (`committed(index, write's result)`), so a commit
    always means "every chunk up to here is written" (and the committer may seal a shard). At most `workers` chunks are in flight; a
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
