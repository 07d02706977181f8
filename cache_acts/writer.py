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
import threading
from collections.abc import Callable
from pathlib import Path
from queue import Queue
from typing import Any, Protocol

import numpy as np
import zarr
from zarr.codecs import BytesCodec
from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding
from zarr.storage import LocalStore

from shared.store import HookStats, checksum, from_storage


class StatsSums:
    """Running float64 sums for a hook's mean vector and mean L2 norm."""

    def __init__(self, d_in: int, total: list[float] | None = None, norm_sum: float = 0.0,
                 count: int = 0):
        self.total = np.zeros(d_in, dtype=np.float64) if total is None else np.array(total)
        self.norm_sum = norm_sum
        self.count = count

    def add(self, x: np.ndarray, dtype: str) -> None:
        """x: [n, d_in] in storage dtype; statistics are of the values as stored. The column
        sums accumulate in float64 without a float64 copy of x; the squared row norms are
        float32 dot products (relative error ~1e-7, far below what a mean norm is used for)."""
        if len(x) == 0:
            return
        v = from_storage(x, dtype).float().numpy()  # [n, d_in] float32 (exact for f16/bf16)
        self.total += v.sum(0, dtype=np.float64)
        sq = np.einsum("ij,ij->i", v, v)  # [n] squared L2 norms
        self.norm_sum += float(np.sqrt(sq, dtype=np.float64).sum())
        self.count += len(x)

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
        tmp = self.scratch / "chunk.partial"
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


def write_chunk(sink: ChunkSink, index: int, records: np.ndarray,
                checksums: dict[str, list[int]]) -> None:
    """Write records [<= chunk_rows] as chunk `index` of every array (field name = array path),
    recording each chunk's CRC32 at position `index` of `checksums[path]`."""
    for path in records.dtype.names:
        block = np.ascontiguousarray(records[path])
        sink.put(path, index, block)
        sums = checksums.setdefault(path, [])
        del sums[index:]
        sums.append(checksum(block))


class ChunkWriterThread(threading.Thread):
    """Writes chunk i (then calls `committed(i)`) while the main thread gathers chunk i + 1.
    Holds at most one chunk being written and one waiting; an error is kept in `error` and
    re-raised by `finish()`."""

    def __init__(self, write: Callable[[int, np.ndarray], None], committed: Callable[[int], None]):
        super().__init__(daemon=True)
        self.write, self.committed = write, committed
        self.queue: Queue[tuple[int, np.ndarray] | None] = Queue(maxsize=1)
        self.error: BaseException | None = None

    def run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue  # keep draining so the producer never blocks
            try:
                self.write(*item)
                self.committed(item[0])
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                self.error = e

    def submit(self, index: int, records: np.ndarray) -> None:
        if self.error is not None:
            self.finish()
        self.queue.put((index, records))

    def finish(self) -> None:
        """Wait for every submitted chunk; re-raise the first error."""
        if self.is_alive():
            self.queue.put(None)
            self.join()
        if self.error is not None:
            raise self.error
