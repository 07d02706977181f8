"""The two-pass shuffle: bucket assignment, bucket count, and that pass 2 emits an exact,
uniform permutation cut into whole chunks."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from cache_acts.rows import RowBatch, record_dtype, to_records
from cache_acts.shuffle import (
    BucketFiles,
    bucket_of,
    choose_n_buckets,
    iter_chunks,
    last_chunk_of_buckets,
)
from shared.errors import UserError
from shared.units import parse_count, parse_size


def test_bucket_of_is_uniform_and_batching_independent():
    rows = np.arange(200_000, dtype=np.int64)
    b = bucket_of(rows, seed=3, n_buckets=8)
    counts = np.bincount(b, minlength=8)
    expected = len(rows) / 8
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 24.3  # chi-square, 7 dof, p = 0.001
    # the same row gets the same bucket whatever batch it arrives in
    parts = np.concatenate([bucket_of(rows[i:i + 777], 3, 8) for i in range(0, len(rows), 777)])
    assert np.array_equal(parts, b)
    assert not np.array_equal(bucket_of(rows, 4, 8), b)  # the seed matters
    assert bucket_of(rows[:5], 3, 1).tolist() == [0] * 5


def test_choose_n_buckets_bounds_the_mean_bucket():
    assert choose_n_buckets(100, 1000) == 1
    assert choose_n_buckets(1000, 1000) == 2
    k = choose_n_buckets(10**9, 2**20)
    assert k & (k - 1) == 0 and 10**9 / k <= 2**19 < 10**9 / (k // 2)


def _scatter(tmp_path, n, seed, k, d=3, batch=7, n_ranks=1):
    """Batch j of the stream scattered by rank j mod n_ranks into its own bucket parts; returns
    rank 0's files and the rows of each part [rank][bucket]."""
    rec = record_dtype(["h"], {"h": d}, "float32")
    folder = tmp_path / f"b{seed}-{n_ranks}"
    ranks = [BucketFiles(folder, k, rec, rank=r, n_ranks=n_ranks)
             for r in range(n_ranks)]
    for j, start in enumerate(range(0, n, batch)):
        files = ranks[j % n_ranks]
        stop = min(start + batch, n)
        idx = np.arange(start, stop)
        rb = RowBatch({"h": np.repeat(idx[:, None], d, 1).astype(np.float32)},
                      idx.astype(np.int32), idx, idx.astype(np.int32) % 5, cursor=stop)
        files.append(to_records(rb, rec, start), bucket_of(idx, seed, k))
        if j % 3 == 2:
            files.flush()
    for files in ranks:
        files.flush()
    return ranks[0], [[s // rec.itemsize for s in files.sizes()] for files in ranks]


@pytest.mark.parametrize("chunk_rows", [1, 4, 10, 1000])
def test_iter_chunks_is_an_exact_permutation_in_whole_chunks(tmp_path, chunk_rows):
    n, k = 103, 8
    files, sizes = _scatter(tmp_path, n, seed=5, k=k)
    assert sum(sizes[0]) == n
    chunks = list(iter_chunks(files, sizes, seed=5, chunk_rows=chunk_rows))
    assert [i for i, _ in chunks] == list(range(math.ceil(n / chunk_rows)))
    assert all(len(c) == chunk_rows for _, c in chunks[:-1])
    order = np.concatenate([c["seq_index"] for _, c in chunks])
    assert sorted(order.tolist()) == list(range(n))
    rows = np.concatenate([c["acts/h"] for _, c in chunks])
    assert np.array_equal(rows[:, 0], order)  # every field of a row moves together
    # restarting from any chunk gives exactly the tail
    for start in (1, len(chunks) - 1):
        tail = list(iter_chunks(files, sizes, seed=5, chunk_rows=chunk_rows, start_chunk=start))
        assert [i for i, _ in tail] == list(range(start, len(chunks)))
        assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(tail, chunks[start:], strict=True))
    # a range [start, stop) is exactly those chunks
    middle = list(iter_chunks(files, sizes, seed=5, chunk_rows=chunk_rows, start_chunk=1,
                              stop_chunk=len(chunks) - 1))
    assert [i for i, _ in middle] == list(range(1, len(chunks) - 1))
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(middle, chunks[1:-1], strict=True))


@pytest.mark.parametrize("n_ranks", [2, 3])
def test_bucket_parts_of_several_ranks_merge_to_the_one_process_stream(tmp_path, n_ranks):
    """Rows scattered by several ranks (each its own batches) come out exactly as from one."""
    one, one_sizes = _scatter(tmp_path, 103, seed=5, k=8)
    many, many_sizes = _scatter(tmp_path, 103, seed=5, k=8, n_ranks=n_ranks)
    assert all(sum(parts) for parts in many_sizes)  # every rank scattered rows
    want = list(iter_chunks(one, one_sizes, seed=5, chunk_rows=10))
    got = list(iter_chunks(many, many_sizes, seed=5, chunk_rows=10))
    assert len(got) == len(want)
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(got, want, strict=True))


@pytest.mark.parametrize("chunk_rows", [1, 4, 10, 1000])
def test_last_chunk_of_buckets_is_where_each_bucket_ends(tmp_path, chunk_rows):
    """Pass 2 deletes a bucket file once this chunk is written, so it must be exact."""
    files, (sizes,) = _scatter(tmp_path, 103, seed=5, k=8)
    sizes[3] = 0  # an empty bucket has no last chunk
    want = [-1] * 8
    for index, chunk in iter_chunks(files, [sizes], seed=5, chunk_rows=chunk_rows):
        for b in bucket_of(chunk["seq_index"], 5, 8):
            want[b] = index
    assert last_chunk_of_buckets(sizes, chunk_rows) == want


def test_permutation_is_uniform(tmp_path):
    """All 4! orders of 4 rows appear equally often over 2400 seeds (chi-square, 23 dof)."""
    perms = {p: i for i, p in enumerate(itertools.permutations(range(4)))}
    counts = np.zeros(len(perms))
    for seed in range(2400):
        rec = record_dtype(["h"], {"h": 1}, "float32")
        files = BucketFiles(tmp_path / "u", 4, rec)
        idx = np.arange(4)
        rb = RowBatch({"h": idx[:, None].astype(np.float32)}, idx.astype(np.int32), idx,
                      idx.astype(np.int32), cursor=4)
        files.truncate_to([0] * 4)
        files.append(to_records(rb, rec, 0), bucket_of(idx, seed, 4))
        files.flush()
        sizes = [s // rec.itemsize for s in files.sizes()]
        (_, chunk), = iter_chunks(files, [sizes], seed, chunk_rows=4)
        counts[perms[tuple(chunk["seq_index"].tolist())]] += 1
    chi2 = ((counts - 100) ** 2 / 100).sum()
    assert chi2 < 49.7  # p = 0.001


def test_units():
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("2gb") == 2 * 10**9
    assert parse_size("1e6") == 10**6
    assert parse_count("200k") == 200_000
    assert parse_count("1.5M") == 1_500_000
    with pytest.raises(UserError, match="cannot read size"):
        parse_size("lots")
    with pytest.raises(UserError, match="not a whole number"):
        parse_count("1.5")
