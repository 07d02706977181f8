"""Exact global shuffle with bounded memory: scatter rows to K random buckets, permute each one.

Pass 1 sends row g (its global index in the source stream) to bucket `bucket_of(g)`, chosen
uniformly from K by a counter-based hash of (seed, g), and appends it to that bucket's file.
Pass 2 reads bucket 0, 1, ..., K-1 in turn, permutes each with a generator seeded by
(seed, bucket) and emits the rows in that order, cut into whole output chunks.

Why the result is exactly uniform (the two-pass shuffle of Rao 1961 / Sandelius 1962): given the
bucket sizes n_1..n_K, every split of the n rows into buckets of those sizes is equally likely
and each bucket's order is uniform, so every one of the n! orders has probability
(n_1!...n_K! / n!) * 1/(n_1!...n_K!) = 1/n!.

Memory: pass 2 holds one bucket plus at most three output chunks (one filling, one queued,
one being written), and, when it writes through the zarr API (compressed or remote stores), the
shard being gathered (cache_acts.writer.ZarrShards). K is the smallest power of two whose
expected bucket is at most half the budget (`choose_n_buckets`), so a bucket exceeds the budget
only if it reaches twice its mean, which by a Chernoff bound has probability <= K*exp(-m/3)
for m rows per bucket on average.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cache_acts.rows import ROW_FIELD
from shared.errors import fail

_GAMMA = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 (Steele, Lea & Flood 2014); wraps modulo 2**64."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def bucket_of(rows: np.ndarray, seed: int, n_buckets: int) -> np.ndarray:
    """Bucket [n] (int64) of each global row index [n]: the top log2(K) bits of the SplitMix64
    stream of `seed` at position row, so exactly uniform over K (a power of two) and the same for
    a given row however the stream is batched or resumed."""
    assert n_buckets >= 1 and n_buckets & (n_buckets - 1) == 0, "K must be a power of two"
    if n_buckets == 1:
        return np.zeros(len(rows), dtype=np.int64)
    with np.errstate(over="ignore"):
        key = _splitmix64(np.array([seed], dtype=np.uint64))[0]
        h = _splitmix64(key + (rows.astype(np.uint64) + np.uint64(1)) * _GAMMA)
    return (h >> np.uint64(64 - n_buckets.bit_length() + 1)).astype(np.int64)


def choose_n_buckets(total_bytes: int, memory_budget: int) -> int:
    """Smallest power of two K with total_bytes / K <= memory_budget / 2."""
    k = 1
    while total_bytes > k * (memory_budget // 2):
        k *= 2
    return k


def bucket_permutation(seed: int, bucket: int, n: int) -> np.ndarray:
    """The order [n] in which bucket `bucket`'s rows are emitted."""
    return np.random.default_rng([seed, bucket]).permutation(n)


class BucketFiles:
    """K append-only files of fixed-size records per rank under `folder` (a rank writes only
    its own part of each bucket), buffered in memory until `flush()` makes everything appended
    so far reach the files. Pass 2 reads every rank's part of a bucket."""

    def __init__(self, folder: Path, n_buckets: int, rec: np.dtype, rank: int = 0,
                 n_ranks: int = 1):
        self.folder = folder
        self.n_buckets = n_buckets
        self.rec = rec
        self.rank, self.n_ranks = rank, n_ranks
        self._pending: list[list[np.ndarray]] = [[] for _ in range(n_buckets)]
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, bucket: int, rank: int | None = None) -> Path:
        """A rank's part of a bucket (this rank's by default)."""
        return self.folder / f"bucket-{bucket:05d}.rank-{self.rank if rank is None else rank}.bin"

    def truncate_to(self, sizes: list[int]) -> None:
        """Cut this rank's files back to their committed sizes in bytes (resume after a crash)."""
        for b, size in enumerate(sizes):
            self._check_part(b, self.rank, size)
            with open(self.path(b), "ab") as f:
                f.truncate(size)

    def check(self, sizes: list[list[int]], needed: list[bool] | None = None) -> None:
        """Refuse to continue from bucket files (of every rank; those `needed`, default all)
        shorter than their committed sizes [rank][bucket]: deleted or cut by hand, they would
        lose rows."""
        for rank, per_bucket in enumerate(sizes):
            for b, size in enumerate(per_bucket):
                if needed is None or needed[b]:
                    self._check_part(b, rank, size)

    def _check_part(self, bucket: int, rank: int, size: int) -> None:
        p = self.path(bucket, rank)
        have = p.stat().st_size if p.exists() else 0
        if have < size:
            fail(f"bucket file {p} holds {have} bytes but {size} were committed: the "
                 f"interrupted run's temporary files were deleted or damaged, so it cannot "
                 "resume; start again with --overwrite")

    def sizes(self) -> list[int]:
        """Bytes in each of this rank's files (only meaningful right after `flush`)."""
        return [self.path(b).stat().st_size if self.path(b).exists() else 0
                for b in range(self.n_buckets)]

    def append(self, records: np.ndarray, buckets: np.ndarray) -> None:
        """Queue records [n] for buckets [n], keeping source order inside each bucket."""
        counts = np.bincount(buckets, minlength=self.n_buckets)
        ends = np.cumsum(counts)
        if self.n_buckets > 1:
            records = records[np.argsort(buckets, kind="stable")]
        for b in np.flatnonzero(counts):
            self._pending[b].append(records[ends[b] - counts[b]:ends[b]])

    def flush(self) -> None:
        for b, pieces in enumerate(self._pending):
            if pieces:
                with open(self.path(b), "ab") as f:
                    for piece in pieces:
                        f.write(piece.data)
                self._pending[b] = []

    def remove(self, bucket: int) -> None:
        """Delete every rank's part of a bucket pass 2 no longer needs (missing is fine:
        resumed runs)."""
        for rank in range(self.n_ranks):
            self.path(bucket, rank).unlink(missing_ok=True)

    def mapped(self, bucket: int, rows_per_rank: list[int]) -> tuple[np.ndarray, np.ndarray | None]:
        """Bucket `bucket` as read-only records and the order that puts them in source order
        (None: they are in it). One rank's part is memory-mapped as it is (no copy); several
        are concatenated (one copy) and ordered by their global row index (each part is in
        source order already, so the stable argsort is a merge)."""
        parts = [self._map(self.path(bucket, r), n) for r, n in enumerate(rows_per_rank) if n]
        if len(parts) <= 1:
            return (parts[0] if parts else np.empty(0, dtype=self.rec)), None
        rows = np.concatenate(parts)
        return rows, np.argsort(rows[ROW_FIELD], kind="stable")

    def _map(self, path: Path, n_rows: int) -> np.ndarray:
        """A part as read-only records [n_rows], memory-mapped (unmapped when the array is
        freed). The file was just written, so its pages are usually in the page cache and no
        private copy is made (numpy.fromfile spent most of its time faulting in a fresh buffer);
        WILLNEED starts read-ahead of the whole part for when they are not."""
        with open(path, "rb") as f:
            m = mmap.mmap(f.fileno(), n_rows * self.rec.itemsize, access=mmap.ACCESS_READ)
        m.madvise(mmap.MADV_WILLNEED)
        return np.frombuffer(m, dtype=self.rec, count=n_rows)


def last_chunk_of_buckets(bucket_rows: list[int], chunk_rows: int) -> list[int]:
    """For each bucket, the index of the last output chunk holding one of its rows (-1 for an
    empty bucket): once that chunk is written, the bucket file is no longer needed."""
    ends = np.cumsum(bucket_rows)
    return [int(end - 1) // chunk_rows if n else -1 for n, end in zip(bucket_rows, ends, strict=True)]


def iter_chunks(
    files: BucketFiles, bucket_rows: list[list[int]], seed: int, chunk_rows: int,
    start_chunk: int = 0, stop_chunk: int | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """(chunk index, records [<= chunk_rows]) of the shuffled stream, chunks
    [start_chunk, stop_chunk). `bucket_rows`: [rank][bucket] rows of each rank's part.

    Output row r is row r of the concatenation of the permuted buckets; only whole chunks are
    emitted (the last one may be short), a bucket's tail carried into the next chunk.
    """
    per_bucket = [sum(parts) for parts in zip(*bucket_rows, strict=True)]
    n_rows = sum(per_bucket)
    if stop_chunk is not None:
        n_rows = min(n_rows, stop_chunk * chunk_rows)
    start_row = start_chunk * chunk_rows
    chunk = np.empty(min(chunk_rows, max(n_rows - start_row, 0)), dtype=files.rec)
    filled, index, first = 0, start_chunk, 0  # first: output row of the bucket's first row
    for b, n in enumerate(per_bucket):
        if first >= n_rows:
            break
        if first + n <= start_row or n == 0:
            first += n
            continue
        rows, order = files.mapped(b, [parts[b] for parts in bucket_rows])
        perm = bucket_permutation(seed, b, n)[max(start_row - first, 0):n_rows - first]
        if order is not None:  # positions in source order -> positions in the merged parts
            perm = order[perm]
        first += n
        while len(perm):
            take = min(len(perm), len(chunk) - filled)
            # mode="clip": numpy gathers straight into `out` (the indices are all valid)
            np.take(rows, perm[:take], out=chunk[filled:filled + take], mode="clip")
            filled += take
            perm = perm[take:]
            if filled == len(chunk):
                yield index, chunk
                index += 1
                filled = 0
                remaining = n_rows - index * chunk_rows
                chunk = np.empty(min(chunk_rows, max(remaining, 0)), dtype=files.rec)
        del rows, order
    assert filled == 0 and index * chunk_rows >= n_rows
