"""The byte layout of a Zarr v3 shard whose inner chunks are uncompressed, as this project
writes and memory-maps them.

A shard object (`sharding_indexed` codec, Zarr v3 spec, with inner codecs `bytes` little endian,
index codecs `bytes` little endian + `crc32c`, index at the end) is

    inner chunk bytes, one after another  |  index: n_inner x (offset, nbytes) uint64 LE  |  crc32c of the index, uint32 LE

An inner chunk absent from the shard (past the end of the array) has offset = nbytes = 2**64 - 1.
With the `bytes` codec an inner chunk is its rows in C order at the full chunk shape (the edge
chunk zero-padded), so a reader can memory-map `nbytes` bytes at `offset` as a [chunk_rows, ...]
array; `cache_acts.writer.RawShards` writes exactly what zarr-python writes for the same rows.
"""

from __future__ import annotations

import google_crc32c  # zarr's own crc32c dependency
import numpy as np

MISSING = np.uint64(2**64 - 1)
INDEX_ENTRY_BYTES = 16  # (offset, nbytes), two uint64
CRC_BYTES = 4


class ShardIndexError(ValueError):
    """A shard's index is unreadable or does not describe the expected inner chunks."""


def index_bytes(n_inner: int, present: int, chunk_nbytes: int) -> bytes:
    """The index and its CRC for a shard whose first `present` of `n_inner` inner chunks are
    stored back to back, `chunk_nbytes` each."""
    index = np.full((n_inner, 2), MISSING, dtype="<u8")
    index[:present, 0] = np.arange(present, dtype=np.uint64) * np.uint64(chunk_nbytes)
    index[:present, 1] = chunk_nbytes
    raw = index.tobytes()
    return raw + np.uint32(google_crc32c.value(raw)).astype("<u4").tobytes()


def index_size(n_inner: int) -> int:
    return n_inner * INDEX_ENTRY_BYTES + CRC_BYTES


def read_index(tail: bytes, n_inner: int) -> np.ndarray:
    """(offset, nbytes) [n_inner, 2] from the last `index_size(n_inner)` bytes of a shard."""
    if len(tail) != index_size(n_inner):
        raise ShardIndexError(f"the shard is too short to hold its index ({len(tail)} bytes)")
    raw, crc = tail[:-CRC_BYTES], tail[-CRC_BYTES:]
    if np.frombuffer(crc, dtype="<u4")[0] != google_crc32c.value(raw):
        raise ShardIndexError("the shard index fails its crc32c")
    return np.frombuffer(raw, dtype="<u8").reshape(n_inner, 2)


def chunk_location(index: np.ndarray, inner: int, chunk_nbytes: int, data_bytes: int
                   ) -> tuple[int, int]:
    """(offset, nbytes) of inner chunk `inner`, checked against the expected size and the
    `data_bytes` that precede the index."""
    offset, nbytes = (int(v) for v in index[inner])
    if offset == int(MISSING):
        raise ShardIndexError(f"inner chunk {inner} is missing from the shard")
    if nbytes != chunk_nbytes:
        raise ShardIndexError(f"inner chunk {inner} has {nbytes} bytes, expected {chunk_nbytes} "
                              "(compressed without saying so in the manifest?)")
    if offset + nbytes > data_bytes:
        raise ShardIndexError(f"inner chunk {inner} lies past the end of the shard's data")
    return offset, nbytes
